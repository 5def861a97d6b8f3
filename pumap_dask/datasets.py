"""Synthetic data: the seed's generators and a cell-like generator for scale runs."""

from __future__ import annotations

import numpy as np


def clusters(
    n_samples: int = 1500,
    n_features: int = 32,
    n_clusters: int = 10,
    random_state: int | None = 42,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters of varied size and spread (the seed's ``type = "cluster"``).

    Each cluster has a centre uniform in [-7.5, 7.5)^d and a standard deviation uniform in
    [0.5, 2.5); its size follows a weight uniform in [0.5, 2.5)
    (``floor(n * w / (n_clusters * 1.25))`` points), topped up with random labels,
    shuffled and truncated to ``n_samples``.

    Returns
    -------
    X : float32 array (n_samples, n_features)
    labels : int64 array (n_samples,)
    """
    if n_samples < 1 or n_features < 1 or n_clusters < 1:
        raise ValueError("n_samples, n_features and n_clusters must be positive")
    rng = np.random.default_rng(random_state)
    centres = rng.uniform(-7.5, 7.5, size=(n_clusters, n_features))
    sds = rng.uniform(0.5, 2.5, size=n_clusters)
    weights = rng.uniform(0.5, 2.5, size=n_clusters)
    sizes = np.floor(n_samples * weights / (n_clusters * 1.25)).astype(np.int64)
    labels = np.repeat(np.arange(n_clusters), sizes)
    short = n_samples - labels.size
    if short > 0:
        labels = np.concatenate([labels, rng.integers(0, n_clusters, size=short)])
    labels = rng.permutation(labels)[:n_samples]
    X = centres[labels] + sds[labels, None] * rng.standard_normal((n_samples, n_features))
    return X.astype(np.float32), labels.astype(np.int64)


def train_test_split(X: np.ndarray, labels: np.ndarray, train_fraction: float = 0.7,
                     random_state: int | None = 42):
    """Random split as in the vignette: ``floor(train_fraction * n)`` rows for training."""
    rng = np.random.default_rng(random_state)
    n = X.shape[0]
    idx = rng.permutation(n)
    n_train = int(np.floor(train_fraction * n))
    tr, te = np.sort(idx[:n_train]), np.sort(idx[n_train:])
    return X[tr], X[te], labels[tr], labels[te]
