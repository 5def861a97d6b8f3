"""pumap_dask: Parametric UMAP at cluster scale.

The package is layered; each module imports only from layers below it (checked by
``tests/test_layers.py``; see ``docs/architecture.md``)::

    errors, _version, arrays, io, params        the base: errors, input checks, parameters
    knn, graph, init, inputs, datasets, ...     the stage maths, single node
    encoder, networks, model                     the networks and the model files
    train (checkpoint, collectives, ...),        training; projection (the encoder alone,
      transform, refine                          and the opt-in polish)
    distributed/                                 the stages across Dask workers and DDP ranks
    continued, writers, state                    continued training, outputs, fitted state
    pipeline                                     the one orchestrator of a fit
    estimator, embed, cli, report, export        the faces
"""

import logging

from . import datasets
from ._version import __version__
from .callbacks import EarlyStopping
from .distributed.knn_dask import nearest_neighbors
from .embed import embed
from .errors import (
                     ClusterError,
                     ConfigError,
                     InputError,
                     InputTypeError,
                     ModelFileError,
                     NetworkError,
                     NotFittedError,
                     ParameterError,
                     PumapError,
                     RankLostError,
                     TrainingError,
)
from .estimator import ParametricUMAP, load
from .graph import fuzzy_simplicial_set
from .train import find_ab_params
from .transform import ood_mask, transform

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "ParametricUMAP", "load", "transform", "embed", "ood_mask", "nearest_neighbors",
    "fuzzy_simplicial_set", "find_ab_params", "EarlyStopping", "datasets", "__version__",
    "PumapError", "ParameterError", "ConfigError", "NetworkError", "InputError",
    "InputTypeError", "ModelFileError", "NotFittedError", "ClusterError", "RankLostError",
    "TrainingError",
]
