import numpy as np
import pytest

from pumap_dask.datasets import clusters, train_test_split


@pytest.fixture(scope="session")
def blobs():
    """The seed's cluster data, small: (X_train, X_test, y_train, y_test)."""
    X, y = clusters(n_samples=600, n_features=16, n_clusters=5, random_state=0)
    return train_test_split(X, y, random_state=0)


@pytest.fixture(scope="session")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float32), d.target


FAST = dict(n_epochs=15, batch_size=2048, hidden_layers=(32, 32), device="cpu")


@pytest.fixture(scope="session")
def fitted(blobs, tmp_path_factory):
    """A small fitted model (shared, treat as read-only)."""
    from pumap_dask import ParametricUMAP

    Xtr = blobs[0]
    return ParametricUMAP(random_state=3, **FAST).fit(Xtr)


@pytest.fixture(scope="module")
def cluster_client():
    """A real distributed.LocalCluster of 2 single-threaded worker processes (per module).

    It is never dask's default scheduler: a test uses it by passing ``client=`` or through
    the ``scheduler`` fixture, so no later test runs on it by accident.
    """
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", memory_limit="2GiB") as cluster:
        with distributed.Client(cluster, set_as_default=False) as client:
            yield client


@pytest.fixture(params=["threads", "distributed"])
def scheduler(request):
    """Run the test under a named scheduler: dask's threads, or a LocalCluster's client
    (made current and dask's scheduler for the test only). Yields the client or None."""
    import dask

    if request.param == "threads":
        with dask.config.set(scheduler="threads"):
            yield None
    else:
        client = request.getfixturevalue("cluster_client")
        with client.as_current(), dask.config.set(scheduler=client):
            yield client
