"""The node-local row cache: rows held once per node, reused only for the same input."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import dask.array as da
import numpy as np
import pytest

from pumap_dask.distributed import rowcache
from pumap_dask.errors import ClusterError, InputError
from pumap_dask.inputs import open_input


def _handle(X, chunks=250):
    h = open_input(da.from_array(X, chunks=(chunks, X.shape[1])))
    return h, h.identity()


def test_rows_are_written_once_and_mapped(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pumap_dask")
    X = np.random.default_rng(0).normal(size=(1000, 7)).astype(np.float32)
    h, ident = _handle(X)
    root = str(tmp_path / "cache")
    rows = rowcache.node_rows(h.darr, ident, root)
    assert isinstance(rows, np.memmap) and not rows.flags.writeable
    np.testing.assert_array_equal(rows, X)
    assert os.path.exists(os.path.join(root, rowcache.CACHE_MARKER))
    meta = json.load(open(rowcache.cache_path(root, ident) + ".json"))
    assert meta["sha256"] == ident["sha256"] and meta["rows"] == 1000
    assert caplog.text.count("row cache: wrote") == 1
    # a second rank (or a rerun) maps the same file without reading the input
    again = rowcache.node_rows(None, ident, root)
    np.testing.assert_array_equal(again, X)
    assert caplog.text.count("row cache: wrote") == 1 and "row cache: reusing" in caplog.text
    assert rowcache.drop(ident, root) and not os.path.exists(rowcache.cache_path(root, ident))


def test_changed_input_is_refused_and_nothing_published(tmp_path):
    X = np.random.default_rng(1).normal(size=(600, 5)).astype(np.float32)
    _, ident = _handle(X)
    Y = X.copy()
    Y[599, 4] += 1.0  # the input changed after the fit read it
    root = str(tmp_path / "cache")
    with pytest.raises(InputError, match="changed while the fit ran"):
        rowcache.node_rows(da.from_array(Y, chunks=(250, 5)), ident, root)
    assert sorted(os.listdir(root)) == [rowcache.CACHE_MARKER]  # no file, no lock, no tmp
    # another input's file is never taken for this one
    h, ident_y = _handle(Y)
    rowcache.node_rows(h.darr, ident_y, root)
    rows = rowcache.node_rows(da.from_array(X, chunks=(250, 5)), ident, root)
    np.testing.assert_array_equal(rows, X)


def test_a_directory_we_do_not_own_is_never_written(tmp_path):
    root = tmp_path / "theirs"
    root.mkdir()
    (root / "data.txt").write_text("someone else's")
    X = np.zeros((50, 3), np.float32)
    h, ident = _handle(X, chunks=50)
    with pytest.raises(ClusterError, match="not created by pumap_dask"):
        rowcache.node_rows(h.darr, ident, str(root))
    assert sorted(os.listdir(root)) == ["data.txt"]


def test_a_dead_writers_lock_is_taken_over(tmp_path):
    X = np.arange(300, dtype=np.float32).reshape(100, 3)
    h, ident = _handle(X, chunks=40)
    root = str(tmp_path / "cache")
    os.makedirs(root)
    open(os.path.join(root, rowcache.CACHE_MARKER), "w").close()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    import socket

    with open(rowcache.cache_path(root, ident) + ".lock", "w") as f:
        f.write(f"{socket.gethostname()} {dead}")
    rows = rowcache.node_rows(h.darr, ident, root, timeout_s=10)
    np.testing.assert_array_equal(rows, X)


_RANK = textwrap.dedent("""
    import json, sys
    import dask.array as da, numpy as np, torch
    from pumap_dask.distributed.rowcache import node_rows
    from pumap_dask.train import TrainConfig, build_encoder, train_encoder

    def mem():
        f = dict(l.split(":", 1) for l in open("/proc/self/smaps_rollup").read().splitlines()[1:])
        return {k: int(f[k].split()[0]) * 1024 for k in ("Rss", "Pss", "Anonymous")}

    root, sha, n, d = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    private = sys.argv[5] == "copy"  # the control: rows loaded into this process
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    head = rng.integers(0, n, 20000).astype(np.int32)
    tail = rng.integers(0, n, 20000).astype(np.int32)
    weight = np.ones(20000, np.float32)
    before = mem()
    X = node_rows(da.from_array(np.zeros((n, d), np.float32)),
                  {"rows": n, "features": d, "sha256": sha}, root)
    if private:
        X = np.array(X)
    X.sum()  # touch every page, as training's random gathers do
    cfg = TrainConfig(n_epochs=1, batch_size=1024, hidden_layers=(8,), init_steps=0)
    train_encoder(X, head, tail, weight, cfg, build_encoder(d, cfg, X))
    X.sum()
    after = mem()
    print(json.dumps({k: after[k] - before[k] for k in after}))
    sys.stdout.flush()
    sys.stdin.read()  # hold the mapping until the other rank has measured too
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux smaps")
def test_two_ranks_on_one_host_hold_the_rows_once(tmp_path):
    """Two training processes on one node map one copy: neither holds the rows in its own
    (anonymous) memory, and their proportional shares add up to about one copy."""
    n, d = 250_000, 40  # 40 MB of rows
    X = np.random.default_rng(2).normal(size=(n, d)).astype(np.float32)
    h, ident = _handle(X, chunks=50_000)
    root = str(tmp_path / "cache")
    rowcache.node_rows(h.darr, ident, root)  # the node's first rank writes the file
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, root, ident["sha256"], str(n),
                               str(d), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True) for mode in ("map", "map", "copy")]
    try:
        grew = [json.loads(p.stdout.readline()) for p in procs]
    finally:
        for p in procs:
            p.communicate("", timeout=300)
    size = X.nbytes
    ranks, control = grew[:2], grew[2]
    for g in ranks:
        # no private copy of the rows (torch's own start-up memory is in both) ...
        assert control["Anonymous"] - g["Anonymous"] > 0.7 * size, grew
        assert g["Rss"] - g["Anonymous"] > 0.8 * size, grew  # ... yet every row is mapped
    # and the two ranks' proportional shares of the mapped rows add up to one copy (the
    # file-backed pages torch's libraries add while training are the control's too)
    libs = control["Pss"] - control["Anonymous"]
    assert sum(g["Pss"] - g["Anonymous"] - libs for g in ranks) < 1.3 * size, grew


def _rss_file_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_mapped_rows_release_their_pages_near_the_memory_limit(tmp_path, caplog):
    # a worker's memory limit counts mapped rows once touched (10M rows: 2 GB): near it
    # the trainer releases them (the page cache keeps them), reading the same rows
    import torch

    from pumap_dask import train
    from pumap_dask.encoder import Encoder

    caplog.set_level(logging.INFO, logger="pumap_dask")
    X = np.random.default_rng(1).normal(size=(200_000, 16)).astype(np.float32)  # 12.8 MB
    h, ident = _handle(X, chunks=50_000)
    rows = rowcache.node_rows(h.darr, ident, str(tmp_path / "cache"))
    enc = Encoder(16, 2, (8,), 0, "silu")
    enc.prepare(X)
    every = torch.arange(0, 200_000, 20)  # a row of every page: the whole map touched
    kept = train.MappedRows(rows, enc)  # no limit: pages stay mapped
    want = enc.preprocess(torch.from_numpy(X[every.numpy()]))
    assert torch.equal(kept[every], want) and kept.releases == 0
    assert _rss_file_kib() * 1024 > 10e6
    bounded = train.MappedRows(rows, enc, memory_limit=1)  # always above its limit
    got = bounded[every]  # released first, then read
    assert torch.equal(got, want) and bounded.releases == 1
    before = _rss_file_kib()
    bounded._keep_under_limit()
    assert bounded.releases == 2 and _rss_file_kib() < before - 10_000  # 12.8 MB let go
    assert torch.equal(bounded[every], want)  # and read again from the page cache
    assert caplog.text.count("releasing the mapped rows' pages") == 1
    roomy = train.MappedRows(rows, enc, memory_limit=1 << 50)
    roomy[every]
    assert roomy.releases == 0
