#!/usr/bin/env bash
# Every GPU path of pumap_dask in one call of a few minutes, for a machine with CUDA
# (tracker issue 9). Prints its figures and writes them to $OUT/gpu_check.log (every line)
# and $OUT/gpu_check.jsonl (one JSON object per figure).
#
# The GPU machine (nvidia-h200: Python 3.12, torch, cupy, numpy, scipy, scikit-learn,
# numba; no network) lacks dask, distributed, zarr and pynndescent: run
# benchmarks/gpu_wheels.sh here first, then carry .whl:
#
#     bash benchmarks/gpu_wheels.sh                  # here: wheels into .whl/ (~13 MiB)
#     run(carry=[".whl"], timeout_s=480, command="bash benchmarks/gpu_check.sh")
#
# Sections (each in its own process, with its own time limit; one failing does not stop
# the others; a summary line per section at the end):
#   info     nvidia-smi, torch/CUDA/cupy versions
#   pytest   tests/test_gpu.py (the CUDA tests; skipped ones say why)
#   knn      exact kNN in CUDA tiles, 200k x 50, k=15: time and recall against a CPU check
#   nccl     training at world size 1 with NCCL: under torchrun, and on a 1-worker Dask
#            cluster (pumap_dask.distributed.ddp.train_on_dask)
#   bf16     fit 100k cell-like rows on CUDA in fp32 and bf16: training time, accuracy
#   cupy     transform of CuPy-backed dask chunks (1M x 50) vs the numpy result and time
#   fit1m    the 1M-row fit on one GPU (cell-like, 900k fitted, 100k held out): timings,
#            held-out 15-NN accuracy, trustworthiness
#
# GPU_CHECK_SMALL=1 runs every section on tiny sizes (and on the CPU where there is no
# CUDA), to check the script itself on a machine without a GPU.
# GPU_CHECK_SECTIONS="knn cupy" runs only those sections.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export GPU_CHECK_JSONL="$OUT/gpu_check.jsonl"
: >"$GPU_CHECK_JSONL"
SMALL=${GPU_CHECK_SMALL:-0}
SECTIONS=${GPU_CHECK_SECTIONS:-"info pytest knn nccl bf16 cupy fit1m"}
T_START=$(date +%s)

PYV=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if compgen -G ".whl/*.whl" >/dev/null && [ "$PYV" != 3.12 ]; then
  echo "== .whl/ holds wheels for Python 3.12, this is $PYV: not installing them"
elif compgen -G ".whl/*.whl" >/dev/null; then
  echo "== installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  else
    echo "!! wheel install failed; continuing with what is installed"
  fi
fi

PY=$(mktemp /tmp/gpu_check_XXXX.py)
cat >"$PY" <<'PYEOF'
"""The Python sections of benchmarks/gpu_check.sh: python3 THIS SECTION."""
import json
import os
import sys
import tempfile
import time

import numpy as np

SMALL = os.environ.get("GPU_CHECK_SMALL", "0") == "1"


def emit(section, **fig):
    fig = {"section": section, **fig}
    print("FIGURE", json.dumps(fig), flush=True)
    with open(os.environ["GPU_CHECK_JSONL"], "a") as f:
        f.write(json.dumps(fig) + "\n")


def device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cells(n, seed=0):
    from pumap_dask.datasets import cell_like

    return cell_like(n, 50, random_state=seed)


def split(X, y, seed=0):
    rng = np.random.default_rng(seed)
    test = np.zeros(len(X), bool)
    test[rng.choice(len(X), size=len(X) // 10, replace=False)] = True
    return X[~test], y[~test], X[test], y[test]


def quality(m, Xtr, ytr, Xte, yte, seed=0):
    from sklearn.manifold import trustworthiness
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(seed)
    tr = rng.choice(len(ytr), size=min(20_000, len(ytr)), replace=False)
    te = rng.choice(len(yte), size=min(5_000, len(yte)), replace=False)
    t0 = time.perf_counter()
    ete = m.transform(Xte, refine=False)  # the encoder (what training made)
    transform_s = time.perf_counter() - t0
    acc = KNeighborsClassifier(15).fit(m.embedding_[tr], ytr[tr]).score(ete[te], yte[te])
    trust = trustworthiness(Xte[te], ete[te], n_neighbors=15)
    return {"acc": round(float(acc), 4), "trust": round(float(trust), 4),
            "transform_s": round(transform_s, 3)}


def sec_knn():
    from pumap_dask.knn import exact_knn

    n, k = (5000, 15) if SMALL else (200_000, 15)
    X, _ = cells(n)
    dev = device()
    exact_knn(X[:4096], k, device=dev)  # warm-up (CUDA context, kernels)
    sync()
    t0 = time.perf_counter()
    ind, dist = exact_knn(X, k, device=dev)
    sync()
    secs = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    q = rng.choice(n, size=500, replace=False)
    d2 = ((X[q, None, :].astype(np.float64) - X[None, :, :]) ** 2).sum(-1)
    d2[np.arange(len(q)), q] = np.inf
    truth = np.argsort(d2, axis=1)[:, :k]
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ind[q], truth)])
    emit("knn", device=dev, n=n, d=50, k=k, seconds=round(secs, 3),
         rows_per_s=round(n / secs), recall_at_k=round(float(recall), 4))
    assert recall > 0.99, recall


def _work_dir(tmp, n):
    """A Zarr input and a finished partitioned fit's work_dir (kNN + edge shards)."""
    import dask

    from pumap_dask import ParametricUMAP
    from pumap_dask.datasets import write_cell_like_zarr

    path = os.path.join(tmp, "x.zarr")
    write_cell_like_zarr(path, n, n_features=50, chunk_rows=max(1000, n // 4), random_state=0)
    work = os.path.join(tmp, "work")
    with dask.config.set(scheduler="threads"):
        ParametricUMAP(knn_method="partitioned", work_dir=work, n_epochs=1,
                       train_world_size=1, device=device(), random_state=0).fit(path)
    return path, work


def sec_nccl():
    import subprocess

    import torch

    from pumap_dask.distributed.edges import EdgeStore

    n = 3000 if SMALL else 50_000
    epochs = 3 if SMALL else 10
    with tempfile.TemporaryDirectory() as tmp:
        path, work = _work_dir(tmp, n)
        n_edges = EdgeStore(os.path.join(work, "graph")).n_edges
        out = os.path.join(tmp, "enc.pt")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "1", "-m", "pumap_dask.distributed.ddp", path, work, out,
               "--n-epochs", str(epochs), "--device", device(), "--timeout", "120"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        secs = time.perf_counter() - t0
        print(proc.stderr[-3000:])
        ok = proc.returncode == 0 and os.path.exists(out)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        steps = epochs * -(-n_edges // 16384)
        emit("nccl", launcher="torchrun", backend=backend, world=1, n=n, epochs=epochs,
             ok=ok, wall_s=round(secs, 2), steps=steps,
             samples_per_s=round(steps * 16384 / secs))
        assert ok, proc.returncode

        import distributed

        from pumap_dask.distributed.ddp import train_on_dask
        from pumap_dask.train import TrainConfig, find_ab_params

        a, b = find_ab_params(1.0, 0.1)
        cfg = TrainConfig(n_epochs=epochs, a=a, b=b, device=device(), random_state=0)
        with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                      dashboard_address=":0") as cluster, \
                distributed.Client(cluster) as client:
            t0 = time.perf_counter()
            enc, hist, world = train_on_dask(client, path, None,
                                             os.path.join(work, "graph"), cfg,
                                             world_size=1, timeout_s=120, max_restarts=0)
            secs = time.perf_counter() - t0
        emit("nccl", launcher="dask", backend=backend, world=world, n=n, epochs=epochs,
             wall_s=round(secs, 2), final_loss=round(hist[-1], 4),
             samples_per_s=round(steps * 16384 / secs))
        assert world == 1 and np.isfinite(hist).all()


def sec_bf16():
    from pumap_dask import ParametricUMAP

    n = 3000 if SMALL else 100_000
    X, y = cells(n)
    Xtr, ytr, Xte, yte = split(X, y)
    for precision in ("fp32", "bf16"):
        m = ParametricUMAP(device=device(), precision=precision, min_dist=0.5,
                           random_state=0, n_epochs=3 if SMALL else None).fit(Xtr)
        q = quality(m, Xtr, ytr, Xte, yte)
        emit("bf16", precision=precision, device=device(), n=len(Xtr),
             epochs=m.n_epochs_, train_s=round(m.timings_["train"], 2),
             fit_s=round(sum(m.timings_.values()), 2), **q)


def sec_cupy():
    import dask
    import dask.array as da

    from pumap_dask import ParametricUMAP, transform

    try:
        import cupy as cp
    except ImportError:
        emit("cupy", skipped="cupy is not installed")
        return
    import torch

    if not torch.cuda.is_available():
        emit("cupy", skipped="no CUDA")
        return
    n, chunk = (20_000, 5_000) if SMALL else (1_000_000, 100_000)
    X, _ = cells(n)
    m = ParametricUMAP(device="cuda", n_epochs=2, random_state=0).fit(X[:20_000])
    xg = cp.asarray(X)
    dg = da.from_array(xg, chunks=(chunk, 50), asarray=False)
    dn = da.from_array(X, chunks=(chunk, 50))
    with dask.config.set(scheduler="threads"):
        lazy = transform(dg, m, device="cuda")
        lazy.to_delayed().ravel()[0].compute()  # warm-up
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        out = lazy.compute()
        cp.cuda.Device().synchronize()
        gpu_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = transform(dn, m, device="cuda").compute()
        host_s = time.perf_counter() - t0
    diff = float(np.abs(cp.asnumpy(out) - ref).max())
    emit("cupy", n=n, chunk_rows=chunk, meta_type=type(lazy._meta).__module__,
         result_type=type(out).__module__, cupy_chunks_s=round(gpu_s, 3),
         numpy_chunks_s=round(host_s, 3), max_abs_diff=diff)
    assert isinstance(out, cp.ndarray) and diff < 1e-3, diff


def sec_fit1m():
    from pumap_dask import ParametricUMAP

    n = 5000 if SMALL else 1_000_000
    t0 = time.perf_counter()
    X, y = cells(n)
    Xtr, ytr, Xte, yte = split(X, y)
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = ParametricUMAP(device=device(), min_dist=0.5, random_state=0,
                       n_epochs=3 if SMALL else None).fit(Xtr)
    fit_s = time.perf_counter() - t0
    q = quality(m, Xtr, ytr, Xte, yte)
    emit("fit1m", device=device(), n_fit=len(Xtr), n_held_out=len(Xte), data_s=round(gen_s, 1),
         fit_s=round(fit_s, 2), knn=m.knn_method_, epochs=m.n_epochs_, n_edges=m.n_edges_,
         timings={k: round(v, 2) for k, v in m.timings_.items()}, **q)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("distributed", "numba", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    globals()["sec_" + sys.argv[1]]()
PYEOF

declare -A RESULT
run_section() {  # name, time limit (s), command...
  local name=$1 limit=$2
  shift 2
  echo
  echo "================ $name (limit ${limit}s) ================"
  local t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local secs=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
  local what=ok
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="TIMED OUT"
  [ $rc -ne 0 ] && [ "$what" = ok ] && what="FAILED (rc=$rc)"
  RESULT[$name]="$what in ${secs}s"
  echo "== $name: ${RESULT[$name]}"
}

info() {
  nvidia-smi || echo "(no nvidia-smi)"
  python3 - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda",
      torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", "SMs", p.multi_processor_count,
          "bf16", torch.cuda.is_bf16_supported(), "nccl", torch.distributed.is_nccl_available())
for mod in ("cupy", "dask", "distributed", "zarr", "pynndescent", "sklearn", "numba"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(mod, "MISSING", type(exc).__name__, exc)
EOF
}

lim() { if [ "$SMALL" = 1 ]; then echo "$2"; else echo "$1"; fi; }  # full, tiny sizes
for sec in $SECTIONS; do
  case $sec in
    info) export -f info; run_section info 60 bash -c info ;;
    pytest) run_section pytest "$(lim 150 150)" python3 -m pytest -q -p no:cacheprovider \
              -o addopts="" -rs tests/test_gpu.py ;;
    knn) run_section knn "$(lim 90 60)" python3 "$PY" knn ;;
    nccl) run_section nccl "$(lim 180 150)" python3 "$PY" nccl ;;
    bf16) run_section bf16 "$(lim 150 90)" python3 "$PY" bf16 ;;
    cupy) run_section cupy "$(lim 90 60)" python3 "$PY" cupy ;;
    fit1m) run_section fit1m "$(lim 180 150)" python3 "$PY" fit1m ;;
    *) echo "unknown section $sec" ;;
  esac
done

echo
echo "================ summary ($(($(date +%s) - T_START))s in all) ================"
for sec in $SECTIONS; do echo "$sec: ${RESULT[$sec]:-not run}"; done
echo "figures:"
cat "$GPU_CHECK_JSONL"
rm -f "$PY"
