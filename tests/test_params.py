"""Every parameter of every public entry point is checked up front, with a message that
names it and its allowed range, before any stage (or cluster) runs."""

import time

import dask.array as da
import numpy as np
import pytest

import pumap_dask
from pumap_dask import ParametricUMAP
from pumap_dask.distributed.graph_dask import build_edge_store

NAN = float("nan")

BAD_ESTIMATOR_PARAMS = [
    ({"max_restarts": -1}, "max_restarts must be an integer >= 0"),
    ({"min_dist": -1}, "min_dist must lie in"),
    ({"min_dist": 2.0}, "min_dist must not exceed spread"),
    ({"min_dist": NAN}, "min_dist must be a finite number"),
    ({"spread": 0}, "spread must lie in"),
    ({"spread": float("inf")}, "spread must be a finite number"),
    ({"learning_rate": NAN}, "learning_rate must be a finite number"),
    ({"learning_rate": 0}, "learning_rate must lie in"),
    ({"correlation_weight": NAN}, "correlation_weight must be a finite number"),
    ({"correlation_weight": -1}, "correlation_weight must lie in"),
    ({"hidden_layers": ()}, "hidden_layers must hold at least one"),
    ({"hidden_layers": (32, 0)}, "each width in hidden_layers"),
    ({"hidden_layers": 5}, "hidden_layers must be a non-empty sequence"),
    ({"n_projection": -5}, "n_projection must be an integer >= 0"),
    ({"tolerance": -1}, "tolerance must lie in"),
    ({"knn_overlap": 0}, "knn_overlap must be a positive integer"),
    ({"n_neighbors": 0}, "n_neighbors must be a positive integer"),
    ({"n_neighbors": 2.5}, "n_neighbors must be a positive integer"),
    ({"n_components": True}, "n_components must be a positive integer"),
    ({"n_epochs": 0}, "n_epochs must be a positive integer"),
    ({"batch_size": -1}, "batch_size must be a positive integer"),
    ({"negative_sample_rate": 0}, "negative_sample_rate must be a positive integer"),
    ({"local_connectivity": NAN}, "local_connectivity must be a finite number"),
    ({"set_op_mix_ratio": 1.5}, "set_op_mix_ratio must lie in"),
    ({"knn_method": "annoy"}, "knn_method must be one of"),
    ({"init": "umap"}, "init must be one of"),
    ({"device": "tpu"}, "device must be"),
    ({"random_state": -3}, "random_state must be an integer >= 0"),
    ({"random_state": "seed"}, "random_state must be"),
]


@pytest.fixture(scope="module")
def big_lazy():
    """A lazy input whose kNN would take minutes: a check that runs late would show."""
    return da.random.random((2_000_000, 50), chunks=(100_000, 50)).astype(np.float32)


@pytest.mark.parametrize("params, message", BAD_ESTIMATOR_PARAMS)
def test_bad_estimator_params_fail_fast(big_lazy, params, message):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        ParametricUMAP(**params).fit(big_lazy)
    assert time.perf_counter() - t0 < 2.0


def test_n_neighbors_against_rows_fails_before_any_stage():
    X = da.zeros((10, 4), chunks=(5, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="needs at least 16"):
        ParametricUMAP().fit(X)


def test_work_dir_must_be_a_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="work_dir.*not a directory"):
        ParametricUMAP(work_dir=str(f)).fit(np.zeros((50, 3), np.float32))


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": -1}, "batch_size must be a positive integer"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"device": "tpu"}, "device must be"),
    ({"nan_policy": "drop"}, "nan_policy must be one of"),
])
def test_transform_arguments_fail_at_call_time(fitted, blobs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pumap_dask.transform(blobs[1], fitted, **kwargs)  # not at compute time


def test_estimator_transform_batch_size(fitted, blobs):
    with pytest.raises(ValueError, match="batch_size"):
        fitted.transform(blobs[1], batch_size=-1)
    # any positive batch size gives the same rows
    np.testing.assert_allclose(fitted.transform(blobs[1], batch_size=7),
                               fitted.transform(blobs[1]), atol=1e-5)


def test_stage_functions_check_their_parameters(tmp_path):
    ind = np.zeros((20, 3), np.int64)
    dist = np.ones((20, 3), np.float32)
    with pytest.raises(ValueError, match="set_op_mix_ratio"):
        pumap_dask.fuzzy_simplicial_set(ind, dist, set_op_mix_ratio=NAN)
    with pytest.raises(ValueError, match="tolerance"):
        build_edge_store(ind, dist, tmp_path, tolerance=0)
    with pytest.raises(ValueError, match="overlap"):
        pumap_dask.nearest_neighbors(np.zeros((50, 3), np.float32), 5, overlap=0)
    with pytest.raises(ValueError, match="method must be one of"):
        pumap_dask.nearest_neighbors(np.zeros((50, 3), np.float32), 5, method="annoy")
