"""numba's on-disk cache directory reaches the Dask workers (issue 19, cold workers)."""

import os

import pytest

from pumap_dask.distributed import cluster as cluster_mod


def _worker_cache_dir():
    """On a worker: the variable and the directory numba itself would use."""
    import numba

    return os.environ.get("NUMBA_CACHE_DIR"), numba.config.CACHE_DIR


def test_numba_cache_dir_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cluster_mod.numba_cache_dir() == str(tmp_path / "pumap_dask" / "numba")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cluster_mod.numba_cache_dir().endswith(os.path.join(".cache", "pumap_dask", "numba"))
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    assert cluster_mod.numba_cache_dir() == str(tmp_path / "mine")


def test_use_numba_cache_sets_numba_config_but_keeps_a_user_setting(monkeypatch, tmp_path):
    import numba

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    try:
        assert cluster_mod.use_numba_cache(str(tmp_path / "a")) == str(tmp_path / "a")
        assert numba.config.CACHE_DIR == str(tmp_path / "a")  # re-read: numba was imported
        # a directory already chosen (by the user, or earlier) is kept
        assert cluster_mod.use_numba_cache(str(tmp_path / "b")) == str(tmp_path / "a")
    finally:
        monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
        numba.core.config.reload_config()


@pytest.mark.distributed
def test_cache_dir_reaches_local_and_plugin_workers(monkeypatch, tmp_path):
    distributed = pytest.importorskip("distributed")
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    want = str(tmp_path / "xdg" / "pumap_dask" / "numba")
    settings = {"scheduler": "local", "workers": 1, "threads": 1, "memory": "2GiB",
                "connect_timeout": 60}
    client = cluster_mod.connect(settings)
    try:  # a LocalCluster from connect(): the workers start with the variable
        assert list(client.run(_worker_cache_dir).values()) == [(want, want)]
    finally:
        cluster_mod.close(client)

    # workers started elsewhere (SLURM, scheduler file, MPI) get it from the plugin, the
    # client's own NUMBA_CACHE_DIR first
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None, memory_limit="2GiB") as lc:
        with distributed.Client(lc, set_as_default=False) as c:
            assert list(c.run(os.environ.get, "NUMBA_CACHE_DIR").values()) == [None]
            mine = str(tmp_path / "shared")
            monkeypatch.setenv("NUMBA_CACHE_DIR", mine)
            cluster_mod.share_numba_cache(c)
            assert list(c.run(_worker_cache_dir).values()) == [(mine, mine)]
