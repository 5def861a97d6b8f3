"""A rare population under fit_rows (issue 20): what a sample of the rows costs the rarest cells.

200,000 trajectory-rich rows (:func:`pumap_dask.datasets.trajectory_like`) plus a rare
population of 300 rows (0.15%) in a tight ball between two populations; 10% held out.
Each fit (all rows, then ``fit_rows`` 50,000 and 20,000; ``min_dist=0.5``, in memory)
is scored by a 15-NN classifier on the whole training embedding: held-out accuracy
overall and for the rare population and the three smallest labels.

Usage::

    python benchmarks/rare_population.py
"""

import json
import time

import numpy as np
from sklearn.neighbors import KNeighborsClassifier

from pumap_dask import ParametricUMAP
from pumap_dask.datasets import trajectory_like

X, y = trajectory_like(200000, random_state=0)
rng = np.random.default_rng(5)
# a rare population: 300 rows (0.15%) in a tight ball between two populations' means
a, b = X[y == 3].mean(0), X[y == 11].mean(0)
centre = (a + b) / 2 + rng.normal(scale=0.5, size=X.shape[1])
rare = centre + rng.normal(scale=0.25 * X[y == 3].std(0).mean(), size=(300, X.shape[1]))
X = np.vstack([X, rare]).astype(np.float32)
y = np.concatenate([y, np.full(300, 99)])
perm = rng.permutation(len(X)); X, y = X[perm], y[perm]
n_test = len(X) // 10
Xte, yte, Xtr, ytr = X[:n_test], y[:n_test], X[n_test:], y[n_test:]
rare_in = KNeighborsClassifier(15).fit(Xtr, ytr).predict(Xte[yte == 99])
print("input-space accuracy of the rare population", (rare_in == 99).mean(), flush=True)
for fr in [None, 50000, 20000]:
    t0 = time.perf_counter()
    m = ParametricUMAP(min_dist=0.5, random_state=0, fit_rows=fr).fit(Xtr)
    fit_s = time.perf_counter() - t0
    clf = KNeighborsClassifier(15).fit(m.embedding_, ytr)
    pred = clf.predict(m.transform(Xte))
    out = {"fit_rows": fr, "fit_s": round(fit_s, 1), "acc": round(float((pred == yte).mean()), 4)}
    for lab in (99, 18, 15, 27):
        sel = yte == lab
        out[f"acc_{lab}"] = round(float((pred[sel] == lab).mean()), 3)
        out[f"n_{lab}"] = int(sel.sum())
    print(json.dumps(out), flush=True)
