"""pumap_dask: Parametric UMAP at cluster scale.

Stages, one module each: :mod:`~pumap_dask.io` (input), :mod:`~pumap_dask.knn`,
:mod:`~pumap_dask.graph`, :mod:`~pumap_dask.train`, :mod:`~pumap_dask.model` (persistence),
:mod:`~pumap_dask.transform`; :mod:`~pumap_dask.estimator` ties them together.
"""

import logging

from . import datasets
from .embed import embed
from .estimator import NotFittedError, ParametricUMAP, load
from .graph import fuzzy_simplicial_set
from .io import InputError
from .model import ModelFileError
from .knn_dask import nearest_neighbors
from .train import EarlyStopping, find_ab_params
from .transform import ood_mask, transform

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "ParametricUMAP", "load", "transform", "embed", "ood_mask", "nearest_neighbors",
    "fuzzy_simplicial_set", "find_ab_params", "EarlyStopping",
    "datasets", "InputError", "ModelFileError", "NotFittedError", "__version__",
]
