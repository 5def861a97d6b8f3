"""fit_rows: a fit of a uniform sample of the rows, every row then embedded by the encoder."""

import logging

import dask
import numpy as np
import pytest

from pumap_dask import ParametricUMAP
from pumap_dask.arrays import sample_ids
from pumap_dask.cli import main
from pumap_dask.datasets import write_cell_like_zarr
from pumap_dask.errors import InputError, ParameterError
from pumap_dask import load as load_model

from .conftest import FAST


def test_a_sample_fit_is_the_fit_of_the_sample(blobs):
    X = blobs[0]
    n, m = len(X), 200
    model = ParametricUMAP(fit_rows=m, random_state=3, **FAST).fit(X)
    ids = sample_ids(n, m, 3)
    alone = ParametricUMAP(random_state=3, **FAST).fit(X[ids])
    assert model.embedding_.shape == (n, 2) and model.n_samples_fit_ == n
    # the same encoder as a fit of the sampled rows, and every row embedded by it
    np.testing.assert_allclose(model.embedding_[ids], alone.embedding_, atol=1e-5)
    np.testing.assert_allclose(model.embedding_, alone.transform(X), atol=1e-5)
    np.testing.assert_allclose(model.transform(X), model.embedding_, atol=1e-5)
    assert getattr(model, "graph_", None) is None  # the sample's graph is not X's
    # at least len(X) rows: every row is fitted, as without the parameter
    every = ParametricUMAP(fit_rows=n, random_state=3, **FAST).fit(X)
    plain = ParametricUMAP(random_state=3, **FAST).fit(X)
    np.testing.assert_array_equal(every.embedding_, plain.embedding_)


def test_labels_are_sampled_with_their_rows(blobs):
    X, y = blobs[0], blobs[2]
    n, m = len(X), 200
    model = ParametricUMAP(fit_rows=m, random_state=1, **FAST).fit(X, y)
    ids = sample_ids(n, m, 1)
    alone = ParametricUMAP(random_state=1, **FAST).fit(X[ids], y[ids])
    np.testing.assert_allclose(model.embedding_, alone.transform(X), atol=1e-5)


@pytest.mark.parametrize("given, match", [
    ({"knn": "knn"}, "knn= is given for every row"),
    ({"landmark_positions": "lm"}, "landmark_positions= pin rows of the fit.*its own "
                                   "landmark_positions="),
])
def test_row_aligned_inputs_are_refused_with_a_sample(blobs, given, match):
    X = blobs[0]
    n = len(X)
    extra = {"knn": (np.zeros((n, 15), np.int64), np.zeros((n, 15), np.float32)),
             "lm": np.full((n, 2), np.nan, np.float32)}
    kwargs = {k: extra[v] for k, v in given.items()}
    with pytest.raises(InputError, match=match):
        ParametricUMAP(fit_rows=100, **FAST).fit(X, **kwargs)


def test_kept_landmarks_are_named_when_a_sample_is_refused(blobs):
    X = blobs[0]
    model = ParametricUMAP(**FAST).fit(X[:300])
    model.add_landmarks(X[:300], idx=np.arange(20))
    model.set_params(fit_rows=100)
    with pytest.raises(InputError, match=r"kept landmarks \(add_landmarks\) pin rows.*"
                                         r"remove_landmarks\(\) first"):
        model.partial_fit(X[300:])


def test_bad_fit_rows_are_refused_before_any_stage(blobs):
    X = blobs[0]
    with pytest.raises(ParameterError, match="fit_rows"):
        ParametricUMAP(fit_rows=0).fit(X)
    with pytest.raises(ParameterError, match="fit_rows"):
        ParametricUMAP(fit_rows=2.5).fit(X)
    with pytest.raises(InputError, match="fit_rows=10 is too few rows for n_neighbors=15"):
        ParametricUMAP(fit_rows=10, **FAST).fit(X)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fit_rows") / "x.zarr")
    write_cell_like_zarr(path, 3000, n_features=20, chunk_rows=1000, random_state=2)
    return path


def test_a_partitioned_fit_of_a_sample_embeds_every_row(store, scheduler, caplog):
    # lazy input: the sample stays lazy; kNN, graph and training (on the workers with the
    # distributed scheduler) see its rows, and the encoder embeds all 3,000
    caplog.set_level(logging.INFO, logger="pumap_dask")
    model = ParametricUMAP(knn_method="partitioned", fit_rows=1200, random_state=0,
                           **FAST).fit(store)
    assert model.embedding_.shape == (3000, 2) and model.n_samples_fit_ == 3000
    np.testing.assert_allclose(model.transform(store), model.embedding_, atol=1e-4)
    assert "fitting a uniform sample of 1200 of the 3000 rows" in caplog.text
    assert model.n_edges_ < 1200 * 2 * 15  # the sample's graph, not all rows'


def test_a_work_dir_is_reused_only_for_the_same_sample(store, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pumap_dask")
    work = str(tmp_path / "work")
    params = dict(knn_method="partitioned", random_state=0, train_world_size=1, **FAST)
    with dask.config.set(scheduler="threads"):
        first = ParametricUMAP(fit_rows=1200, work_dir=work, **params).fit(store)
        caplog.clear()
        again = ParametricUMAP(fit_rows=1200, work_dir=work, **params).fit(store)
        assert "kNN reused" in caplog.text
        np.testing.assert_array_equal(again.embedding_, first.embedding_)
        caplog.clear()
        other = ParametricUMAP(fit_rows=1500, work_dir=work, **params).fit(store)
        assert "kNN reused" not in caplog.text  # other rows: computed again
        fresh = ParametricUMAP(fit_rows=1500, work_dir=str(tmp_path / "w2"),
                               **params).fit(store)
    np.testing.assert_array_equal(other.embedding_, fresh.embedding_)


def test_the_command_line_fits_a_sample(store, tmp_path, capsys):
    out = str(tmp_path / "model")
    assert main(["-q", "fit", store, out, "--scheduler", "threads", "--device", "cpu",
                 "--fit-rows", "1000", "--params", '{"n_epochs": 5, "hidden_layers": [16]}']) == 0
    model = load_model(out)
    assert model.fit_rows == 1000 and model.n_samples_fit_ == 3000
    capsys.readouterr()
    assert main(["info", out]) == 0
    assert "3,000 (kNN, graph and training on a sample of 1,000)" in capsys.readouterr().out


def test_a_fit_whose_budget_passes_over_its_graph_once_names_a_sample(blobs, caplog,
                                                                      monkeypatch):
    from pumap_dask import train

    X = blobs[0]
    caplog.set_level(logging.INFO, logger="pumap_dask")
    # the default budget's cap binding: one pass over all rows' graph
    monkeypatch.setattr(train, "MAX_SAMPLES", 2048)
    params = dict(FAST, n_epochs=None)
    model = ParametricUMAP(random_state=0, **params).fit(X)
    assert model.n_epochs_ == 1
    want = train.sample_for_epochs(len(X), model.n_edges_, "edges")
    assert want == int(2048 * len(X) / (8 * model.n_edges_)) > 0
    assert f"fit_rows={want} would pass 8 times over a sample's graph" in caplog.text
    caplog.clear()
    ParametricUMAP(random_state=0, fit_rows=300, **params).fit(X)  # asked for: no advice
    assert "would pass" not in caplog.text


class _CountingRows:
    """An array whose reads are counted (a store stand-in)."""

    def __init__(self, a):
        self.a, self.shape, self.dtype, self.ndim, self.reads = a, a.shape, a.dtype, a.ndim, 0

    def __getitem__(self, key):
        self.reads += 1
        return self.a[key]


def test_a_lazy_sample_and_its_input_are_identified_in_one_read(blobs):
    import dask.array as da

    from pumap_dask.inputs import identities, open_input

    X = blobs[0].astype(np.float32)
    src = _CountingRows(X)
    whole = open_input(da.from_array(src, chunks=(100, -1)))
    sample, _ = whole.sample(150, 0)
    before = src.reads  # dask's probes of the array's type, when wrapped
    with dask.config.set(scheduler="threads"):
        joint = identities([whole, sample])
    assert src.reads - before == len(whole.darr.chunks[0])  # each block once, for both
    # the same identities as each computed alone
    alone = open_input(da.from_array(X, chunks=(100, -1)))
    assert joint == [alone.identity(), alone.sample(150, 0)[0].identity()]
    assert joint[0]["sha256"] != joint[1]["sha256"] and joint[1]["rows"] == 150


def test_a_lazy_sample_opens_on_a_worker_from_a_few_bytes(store, monkeypatch):
    import cloudpickle

    from pumap_dask import pipeline
    from pumap_dask.inputs import RowSample, open_input

    whole = open_input(store)
    sample, ids = whole.sample(1200, 0)
    source, key = sample.opener()
    assert isinstance(source, RowSample) and key is None
    assert len(cloudpickle.dumps(source)) < 1000  # not the 1,200 ids in a dask graph
    again = open_input(source)  # what a training rank does with it
    np.testing.assert_array_equal(again.darr.compute(), whole.darr.compute()[ids])
    assert again.identity() == sample.identity()
    # DDP ranks are sent the recipe, whatever the size of the sample's graph
    monkeypatch.setattr(pipeline, "MAX_SHIPPED_GRAPH", 64)
    assert pipeline._unreadable_by_workers(sample.darr) is not None
    assert pipeline._unreadable_by_workers(source) is None
    # an input the workers cannot read is still refused through its sample
    import dask.array as da

    mem = open_input(da.from_array(np.asarray(whole.darr), chunks=(1000, -1)))
    assert "in-memory data" in pipeline._unreadable_by_workers(mem.sample(1200, 0)[0].opener()[0])


def test_ddp_ranks_open_the_sample_themselves(store, cluster_client, caplog):
    # two Gloo ranks on the LocalCluster, each opening the sample from its recipe
    caplog.set_level(logging.INFO, logger="pumap_dask")
    with cluster_client.as_current(), dask.config.set(scheduler=cluster_client):
        model = ParametricUMAP(knn_method="partitioned", fit_rows=1200, random_state=0,
                               train_world_size=2, **FAST).fit(store)
    assert "DDP over 2 ranks" in caplog.text
    assert model.embedding_.shape == (3000, 2) and model.n_samples_fit_ == 3000
    np.testing.assert_allclose(model.transform(store), model.embedding_, atol=1e-4)
