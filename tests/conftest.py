import os
import signal
import threading
import time

import numpy as np
import psutil
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


class Killed(Exception):
    """A training run stopped by :func:`kill_at` (the tests of resuming a checkpoint)."""


def kill_at(stop: int):
    """A training callback that raises :class:`Killed` at the end of epoch ``stop``."""

    def callback(epoch: int, loss: float) -> None:
        if epoch == stop:
            raise Killed

    return callback


def slow_writer(call: str) -> list[str]:
    """A command line running ``call`` (a ``pumap_dask.writers`` call, module as ``w``) in
    a real process, each block's write slowed, so a test can kill it halfway."""
    import sys
    import textwrap

    return [sys.executable, "-c", textwrap.dedent(f"""
        import time, dask, pumap_dask.writers as w
        orig = w._write_block
        def slow(*a, **k):
            time.sleep(0.05)
            return orig(*a, **k)
        w._write_block = slow
        with dask.config.set(scheduler="synchronous"):
            {call}
    """)]


@pytest.fixture()
def store(blobs, tmp_path):
    """The seed clusters' training rows as a Zarr array (chunks of 64 rows); its path."""
    import zarr

    z = zarr.create_array(str(tmp_path / "in.zarr"), shape=blobs[0].shape, chunks=(64, 16),
                          dtype="float32")
    z[:] = blobs[0]
    return str(tmp_path / "in.zarr")


# --------------------------------------------------------------------------- run control
INTERRUPT_GRACE_S = float(os.environ.get("PUMAP_TEST_INTERRUPT_GRACE", "10"))


def _end_after_grace() -> None:
    """Ctrl-C must end the run: if teardown (a LocalCluster, DDP ranks in a collective) still
    holds the process after the grace period, kill its children and exit."""
    time.sleep(INTERRUPT_GRACE_S)
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
    os._exit(130)


def _on_interrupt(signum, frame):
    threading.Thread(target=_end_after_grace, daemon=True).start()
    signal.default_int_handler(signum, frame)  # pytest's KeyboardInterrupt: a normal summary


def pytest_configure(config):
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_interrupt)


def pytest_collection_modifyitems(config, items):
    """Mark every test that runs on a real distributed.LocalCluster as ``distributed``
    (``-m "not distributed"`` runs the threaded half alone)."""
    for item in items:
        spec = getattr(item, "callspec", None)
        on_cluster = ("cluster_client" in item.fixturenames
                      or (spec is not None and spec.params.get("scheduler") == "distributed"))
        if on_cluster:
            item.add_marker(pytest.mark.distributed)
