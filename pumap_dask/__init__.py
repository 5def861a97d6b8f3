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

Most public names are loaded on first use (PEP 562): a Dask worker that unpickles a
transform task imports the encoder's modules (torch) and not the estimator's (scikit-learn,
2-3 s more per worker start). ``transform`` is imported here: the function shares its name
with its module, and a first import of the module would otherwise bind the module.
"""

import importlib
import logging

from ._version import __version__
from .transform import ood_mask, transform

logging.getLogger(__name__).addHandler(logging.NullHandler())

# public name -> the module that defines it
_PUBLIC = {
    "ParametricUMAP": "estimator", "load": "estimator", "embed": "embed",
    "nearest_neighbors": "distributed.knn_dask",
    "fuzzy_simplicial_set": "graph", "find_ab_params": "train", "EarlyStopping": "callbacks",
    **{name: "errors" for name in (
        "PumapError", "ParameterError", "ConfigError", "NetworkError", "InputError",
        "InputTypeError", "ModelFileError", "NotFittedError", "ClusterError", "RankLostError",
        "TrainingError")},
}

__all__ = [*_PUBLIC, "transform", "ood_mask", "datasets", "__version__"]


def __getattr__(name: str):
    """The public names and the package's modules, imported when first asked for."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
