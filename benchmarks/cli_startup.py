"""Start-up of the command line: what a `pumap-dask transform` costs beyond the transform.

Writes a trajectory-like Zarr (default 200k x 50) and a small model once, then times, each
``--repeats`` times in fresh processes: the imports a Dask worker pays to run a transform
task (``import pumap_dask.transform``), the client's imports (``import pumap_dask.cli``),
and a whole ``pumap-dask transform DATA MODEL --out OUT`` on its default 2-worker
LocalCluster. Compare code versions by running it under each with ``PYTHONPATH``::

    python benchmarks/cli_startup.py --workdir /tmp/cs
    PYTHONPATH=/tmp/old python benchmarks/cli_startup.py --workdir /tmp/cs
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time

logger = logging.getLogger("cli_startup")


def _wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def prepare(workdir: str, n: int) -> tuple[str, str]:
    """The data and the model (written once; a few epochs, quality is irrelevant here)."""
    from pumap_dask import ParametricUMAP
    from pumap_dask.datasets import trajectory_like, write_trajectory_like_zarr

    data, model = os.path.join(workdir, f"data_{n}.zarr"), os.path.join(workdir, "model")
    if not os.path.exists(data):
        write_trajectory_like_zarr(data, n, 50, chunk_rows=50_000)
    if not os.path.exists(model):
        X, _ = trajectory_like(5000, 50, random_state=0)
        ParametricUMAP(n_epochs=2, random_state=0, device="cpu").fit(X).save(model)
    return data, model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/pumap_cli_startup")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.makedirs(args.workdir, exist_ok=True)
    data, model = prepare(args.workdir, args.n)
    cli = shutil.which("pumap-dask") or "pumap-dask"
    out = os.path.join(args.workdir, "emb.zarr")
    runs = {
        "import pumap_dask.transform (a worker)": [sys.executable, "-c",
                                                   "import pumap_dask.transform"],
        "import pumap_dask.cli (the client)": [sys.executable, "-c", "import pumap_dask.cli"],
        f"pumap-dask transform, {args.n} rows": [cli, "transform", data, model, "--out", out,
                                                 "--overwrite"],
    }
    for name, cmd in runs.items():
        walls = []
        for _ in range(args.repeats):
            shutil.rmtree(out, ignore_errors=True)
            walls.append(_wall(cmd))
        logger.info("%-42s median %.2f s (%s)", name, statistics.median(walls),
                    ", ".join(f"{w:.2f}" for w in walls))


if __name__ == "__main__":
    main()
