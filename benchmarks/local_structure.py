"""Local structure on trajectory-rich data (issue 20): one factor at a time, against umap-learn.

On :func:`pumap_dask.datasets.trajectory_like` (``--n`` rows, 90% training / 10% held out,
in memory, ``min_dist=0.5``, one seed) the kNN, fuzzy graph and initial layout are built
once by the pipeline's own stages; each configuration then trains an encoder on them
(:func:`pumap_dask.pipeline.run_train` with the default :func:`~pumap_dask.pipeline.train_config`
changed in one field, or a custom network). umap-learn fits the same training rows from
scratch. Reported per configuration:

* ``kp_train``: :func:`pumap_dask.report_metrics.knn_preservation` (share of each row's 15
  input-space neighbours among its 15 embedding neighbours) on ``--sample`` training rows;
* ``kp_full``: the same share for those rows, their neighbours searched among *all*
  training rows (input space vs training embedding): the finer scale;
* ``kp_test``: knn_preservation of the held-out rows' transform (``--sample`` of them);
* ``kp_test_full``: held-out rows' 15 input-space neighbours among the training rows that
  stay among their 15 neighbours in the training embedding (how well transform places
  new rows among their neighbours);
* ``acc``: 15-NN accuracy of the held-out transform (classifier on the training embedding);
* ``trust``: trustworthiness (k=15) of the held-out transform;
* ``fit_s``: for pumap_dask the shared stages' time (kNN + graph + init, measured once)
  plus this configuration's training; for umap-learn its whole ``fit``.

Configurations are named ``key=value`` overrides of the trainer's config (``n_epochs``,
``batch_size``, ``learning_rate``, ``lr_schedule``, ``negatives``,
``negative_sample_rate``, ``hidden_layers`` as ``256x256``, ``init_steps``,
``num_threads``; ``replicas=1`` trains with one replica, the schedule before
:mod:`pumap_dask.replicas`) or of the
network (``act=silu``; ``rff=SCALE`` random Fourier features of the centred, RMS-scaled
input with ``rff_m`` frequencies, ``rff_learn=1`` to train them, ``rff_hidden=256x256``;
``hidden=128x64x32`` a plain custom MLP; ``norm=layer`` a LayerNorm before each hidden
activation), joined by ``,``: e.g. ``rff=4,n_epochs=40``. ``default`` is no override; ``umap`` is
umap-learn. ``epochs*K`` multiplies the default epochs by K.

Run with one core (the machine is shared)::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1 \\
        python benchmarks/local_structure.py --n 20000 --configs umap default epochs*3 \\
        batch_size=4096 negatives=pool rff=4 --json ls20k.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time

import numpy as np
import torch
from sklearn.manifold import trustworthiness
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
from torch import nn

from pumap_dask import ParametricUMAP, train
from pumap_dask.datasets import trajectory_like
from pumap_dask.encoder import encode
from pumap_dask.inputs import open_input
from pumap_dask.networks import CustomEncoder
from pumap_dask.pipeline import run_graph, run_init, run_knn, run_train, train_config
from pumap_dask.report_metrics import knn_preservation
from pumap_dask.train import find_ab_params

logger = logging.getLogger("local_structure")
K = 15


# --------------------------------------------------------------------------- networks
class Standardise(nn.Module):
    """Centre by the training mean and divide by one global RMS (the default encoder's
    preprocessing), as fixed buffers."""

    def __init__(self, X: np.ndarray) -> None:
        super().__init__()
        S = np.asarray(X[:20000], dtype=np.float64)
        mean = S.mean(0)
        self.register_buffer("center", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(float(np.sqrt(((S - mean) ** 2).mean()))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.center) / self.scale


class FourierFeatures(nn.Module):
    """``[sin(z W), cos(z W)]`` of standardised rows z, W ~ N(0, scale^2 / d)."""

    def __init__(self, d: int, m: int, scale: float, learn: bool, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(d, m, generator=g) * (scale / math.sqrt(d))
        if learn:
            self.W = nn.Parameter(W)
        else:
            self.register_buffer("W", W)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        p = z @ self.W
        return torch.cat([torch.sin(p), torch.cos(p)], dim=1)


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split("x") if v)


def custom_network(X: np.ndarray, net_opts: dict, seed: int) -> CustomEncoder:
    """The sweep's custom encoders: an MLP with another activation, or random Fourier
    features then SiLU layers, each behind the default encoder's standardisation."""
    d = X.shape[1]
    torch.manual_seed(seed)
    if "rff" in net_opts:
        m = int(net_opts.get("rff_m", 256))
        hidden = _dims(net_opts.get("rff_hidden", "256x256"))
        layers: list[nn.Module] = [Standardise(X),
                                   FourierFeatures(d, m, float(net_opts["rff"]),
                                                   bool(int(net_opts.get("rff_learn", 0))),
                                                   seed)]
        width = 2 * m
    else:
        hidden = _dims(net_opts.get("hidden", "128x64x32"))
        layers, width = [Standardise(X)], d
    act = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU,
           "leaky": lambda: nn.LeakyReLU(0.1)}[net_opts.get("act", "silu")]
    norm = net_opts.get("norm")
    for h in hidden:
        layers += [nn.Linear(width, h)] + ([nn.LayerNorm(h)] if norm == "layer" else []) + [act()]
        width = h
    layers.append(nn.Linear(width, 2))
    return CustomEncoder(nn.Sequential(*layers), (d,), 2)


# --------------------------------------------------------------------------- metrics
def _neighbours(ref: np.ndarray, query: np.ndarray, exclude_self: bool) -> np.ndarray:
    nn_ = NearestNeighbors(n_neighbors=K + int(exclude_self)).fit(ref)
    ind = nn_.kneighbors(query, return_distance=False)
    return ind[:, 1:] if exclude_self else ind


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(x, y)) for x, y in zip(a, b)]) / K)


def metrics(Xtr, ytr, Xte, yte, E_tr, E_te, sample_tr, sample_te, in_nn_tr, in_nn_te) -> dict:
    """The report's measures of one embedding (see the module docstring)."""
    out = {
        "kp_train": knn_preservation(Xtr[sample_tr], E_tr[sample_tr], K),
        "kp_full": _overlap(in_nn_tr, _neighbours(E_tr, E_tr[sample_tr], True)),
        "kp_test": knn_preservation(Xte[sample_te], E_te[sample_te], K),
        "kp_test_full": _overlap(in_nn_te, _neighbours(E_tr, E_te[sample_te], False)),
        "acc": float(KNeighborsClassifier(K).fit(E_tr, ytr).score(E_te, yte)),
        "trust": float(trustworthiness(Xte[sample_te], E_te[sample_te], n_neighbors=K)),
    }
    return out


# --------------------------------------------------------------------------- runs
DEFAULT_REPLICAS = train.REPLICAS


def split(n: int, seed: int, sample: int) -> tuple:
    """``trajectory_like(n)`` split 90/10 into training and held-out rows (``Xtr, ytr, Xte,
    yte``), the ``sample`` rows of each that are scored (``s_tr, s_te``) and their
    input-space neighbours among the training rows (``in_nn_tr, in_nn_te``)."""
    X, y = trajectory_like(n, 50, random_state=seed)
    perm = np.random.default_rng(seed).permutation(n)
    n_tr = int(0.9 * n)
    tr, te = np.sort(perm[:n_tr]), np.sort(perm[n_tr:])
    Xtr, ytr, Xte, yte = X[tr], y[tr], X[te], y[te]
    rng = np.random.default_rng(seed + 1)
    s_tr = np.sort(rng.choice(len(tr), min(sample, len(tr)), replace=False))
    s_te = np.sort(rng.choice(len(te), min(sample, len(te)), replace=False))
    return (Xtr, ytr, Xte, yte, s_tr, s_te, _neighbours(Xtr, Xtr[s_tr], True),
            _neighbours(Xtr, Xte[s_te], False))


def parse_config(name: str, default_epochs: int) -> tuple[dict, dict]:
    """(TrainConfig overrides, custom-network options) of a configuration name."""
    cfg: dict = {}
    net: dict = {}
    if name == "default":
        return cfg, net
    for part in name.split(","):
        if part.startswith("epochs*"):
            cfg["n_epochs"] = round(default_epochs * float(part[7:]))
            continue
        key, value = part.split("=")
        if key in ("n_epochs", "batch_size", "negative_sample_rate", "init_steps",
                   "negative_pool", "num_threads", "replicas"):
            cfg[key] = int(value)
        elif key in ("learning_rate", "weight_decay"):
            cfg[key] = float(value)
        elif key in ("lr_schedule", "negatives", "batching", "activation"):
            cfg[key] = value
        elif key == "hidden_layers":
            cfg[key] = _dims(value)
        elif key in ("act", "rff", "rff_m", "rff_learn", "rff_hidden", "hidden", "norm"):
            net[key] = value
        else:
            raise ValueError(f"unknown factor {key!r} in {name!r}")
    return cfg, net


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample", type=int, default=3000)
    ap.add_argument("--min-dist", type=float, default=0.5)
    ap.add_argument("--configs", nargs="+", default=["umap", "default"])
    ap.add_argument("--json", help="append the rows to this JSON file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)

    Xtr, ytr, Xte, yte, s_tr, s_te, in_nn_tr, in_nn_te = split(args.n, args.seed, args.sample)

    def score(E_tr: np.ndarray, E_te: np.ndarray) -> dict:
        return metrics(Xtr, ytr, Xte, yte, E_tr, E_te, s_tr, s_te, in_nn_tr, in_nn_te)

    est = ParametricUMAP(min_dist=args.min_dist, random_state=args.seed, device="cpu")
    params = est.get_params()
    prep = None
    rows = []
    print(f"{'config':34} {'kp_train':>8} {'kp_full':>7} {'kp_test':>7} {'kp_tfull':>8} "
          f"{'acc':>6} {'trust':>6} {'epochs':>6} {'fit_s':>7}", flush=True)
    for name in args.configs:
        if name == "umap":
            import umap

            t0 = time.perf_counter()
            model = umap.UMAP(min_dist=args.min_dist, random_state=args.seed, n_jobs=1)
            E_tr = model.fit_transform(Xtr)
            fit_s = time.perf_counter() - t0
            E_te = model.transform(Xte)
            row = {"config": "umap-learn", "epochs": None, "fit_s": fit_s}
        else:
            if prep is None:
                t0 = time.perf_counter()
                handle = open_input(Xtr)
                edges = run_graph(run_knn(handle, params, "cpu"), params)
                layout = run_init(handle, edges, params, "cpu")
                a, b = find_ab_params(params["spread"], params["min_dist"])
                base = train_config(params, len(edges), Xtr.shape[1], "cpu", a, b, len(Xtr))
                prep = (edges, layout, base, time.perf_counter() - t0)
                logger.info("kNN + graph + init %.1fs, %d edges, default %d epochs",
                            prep[3], len(edges), base.n_epochs)
            edges, layout, base, prep_s = prep
            over, net_opts = parse_config(name, base.n_epochs)
            train.REPLICAS = over.pop("replicas", DEFAULT_REPLICAS)
            cfg = dataclasses.replace(base, **{"num_threads": 1, **over})
            network = custom_network(Xtr, net_opts, args.seed) if net_opts else None
            t0 = time.perf_counter()
            trained = run_train(Xtr, edges, layout, cfg, network=network)
            train_s = time.perf_counter() - t0
            E_tr, E_te = encode(trained.encoder, Xtr), encode(trained.encoder, Xte)
            row = {"config": name, "epochs": cfg.n_epochs, "fit_s": prep_s + train_s,
                   "train_s": train_s, "steps": cfg.n_epochs * math.ceil(len(edges)
                                                                         / cfg.batch_size)}
        row.update(score(np.asarray(E_tr), np.asarray(E_te)), n=args.n, seed=args.seed)
        rows.append(row)
        print(f"{row['config']:34} {row['kp_train']:8.3f} {row['kp_full']:7.3f} "
              f"{row['kp_test']:7.3f} {row['kp_test_full']:8.3f} {row['acc']:6.3f} "
              f"{row['trust']:6.3f} {row['epochs'] or '':>6} {row['fit_s']:7.1f}", flush=True)
        if args.json:
            try:
                with open(args.json) as f:
                    old = json.load(f)
            except FileNotFoundError:
                old = []
            with open(args.json, "w") as f:
                json.dump(old + [row], f, indent=1)


if __name__ == "__main__":
    main()
