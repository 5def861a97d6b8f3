"""The distributed layer: the single-node stages run across Dask workers and torch ranks.

:mod:`.knn_dask` (partitioned kNN), :mod:`.graph_dask` (fuzzy graph as edge shards),
:mod:`.edges` (the edge store), :mod:`.ddp` (DDP training, one rank per worker) and
:mod:`.cluster` (connecting to or starting a Dask cluster). This layer imports the
single-node maths below it; nothing single-node imports it.
"""
