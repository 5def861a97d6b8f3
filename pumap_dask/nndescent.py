"""NN-descent kNN of one in-memory block, compiled once per machine (the partitions' search).

pynndescent's ``nn_descent`` takes its distance function as an argument, which numba
cannot cache: every fresh process (every new Dask worker) compiles it again, 60-150 s on
two cores (``benchmarks/RESULTS.md``, "Cold workers"). This kernel fixes the distance
(squared Euclidean in float32) inside one function, so numba caches it on disk
(:func:`pumap_dask.arrays.host_kernel`) and a cold worker loads it in well under a second.

The algorithm is NN-descent (Dong, Charikar and Li, 2011) as pynndescent runs it:

1. a random-projection forest: each tree splits its rows by the hyperplane halfway
   between two random rows until a leaf holds at most ``leaf_size`` rows; every pair in a
   leaf is a candidate;
2. rows still holding fewer than ``k`` candidates get random ones;
3. each iteration samples at most ``max_candidates`` new and old neighbours per row (its
   own and the rows that list it, by random priority), and joins new with new and new
   with old: every pair's distance is offered to both rows' heaps;
4. it stops after ``n_iters`` iterations or when fewer than ``delta * k * n`` heap entries
   changed in one.

It runs on one thread (Dask runs the partitions in parallel) and is deterministic for a
given ``random_state``. Cosine neighbours are the Euclidean neighbours of the unit rows
(:func:`pumap_dask.knn.descent_knn` handles that), so one compiled kernel serves both.
"""

from __future__ import annotations

import numpy as np

from .arrays import host_kernel

# pynndescent's defaults for the forest's leaves and the stopping rule
MIN_LEAF_SIZE = 10
DELTA = 0.001


def _descent(X, k, n_trees, leaf_size, max_candidates, n_iters, delta, seed):
    """NN-descent of the rows of ``X`` (float32, C order): heaps of ``k`` neighbours.

    Returns (indices int32, squared distances float32), each row's list unsorted, self
    excluded, -1 / inf where a row has fewer than k other rows.
    """
    np.random.seed(seed)
    n, d = X.shape
    ind = np.full((n, k), -1, dtype=np.int32)
    dist = np.full((n, k), np.inf, dtype=np.float32)
    new = np.zeros((n, k), dtype=np.uint8)

    def sqdist(a, b):
        xa, xb = X[a], X[b]
        s = np.float32(0.0)
        for t in range(d):
            diff = xa[t] - xb[t]
            s += diff * diff
        return s

    def heap_push(keys, ids, flags, i, key, j):
        # row i of a max-heap on keys (root, the largest kept, at slot 0) without duplicate
        # ids: insert j if its key beats the root; the entry is flagged new
        size = keys.shape[1]
        if not key < keys[i, 0]:
            return 0
        for t in range(size):
            if ids[i, t] == j:
                return 0
        pos = 0
        while True:
            left = 2 * pos + 1
            if left >= size:
                break
            right = left + 1
            c = left if right >= size or keys[i, left] >= keys[i, right] else right
            if keys[i, c] > key:
                keys[i, pos] = keys[i, c]
                ids[i, pos] = ids[i, c]
                flags[i, pos] = flags[i, c]
                pos = c
            else:
                break
        keys[i, pos] = key
        ids[i, pos] = j
        flags[i, pos] = 1
        return 1

    def push(i, j, dd):
        return heap_push(dist, ind, new, i, dd, j)

    # 1. random-projection forest
    order = np.arange(n)
    stack = np.empty((2 * n + 2, 2), dtype=np.int64)
    side = np.empty(n, dtype=np.bool_)
    normal = np.empty(d, dtype=np.float32)
    for _ in range(n_trees):
        np.random.shuffle(order)
        stack[0, 0], stack[0, 1] = 0, n
        top = 1
        while top > 0:
            top -= 1
            lo, hi = stack[top, 0], stack[top, 1]
            m = hi - lo
            if m <= leaf_size:
                for a in range(lo, hi):
                    for b in range(a + 1, hi):
                        p, q = order[a], order[b]
                        dd = sqdist(p, q)
                        push(p, q, dd)
                        push(q, p, dd)
                continue
            a = order[lo + np.random.randint(m)]
            b = order[lo + np.random.randint(m)]
            n_left = 0
            if a != b:
                offset = np.float32(0.0)
                for t in range(d):
                    normal[t] = X[a, t] - X[b, t]
                    offset += normal[t] * np.float32(0.5) * (X[a, t] + X[b, t])
                for r in range(lo, hi):
                    row = order[r]
                    margin = -offset
                    for t in range(d):
                        margin += normal[t] * X[row, t]
                    if margin > 0:
                        side[r - lo] = True
                    elif margin < 0:
                        side[r - lo] = False
                    else:
                        side[r - lo] = np.random.random() < 0.5
                    if side[r - lo]:
                        n_left += 1
            if n_left == 0 or n_left == m:  # no split (duplicates, or a == b): halve
                n_left = m // 2
                for r in range(m):
                    side[r] = r < n_left
            # stable in-place partition of order[lo:hi] by side
            buf = order[lo:hi].copy()
            li, ri = lo, lo + n_left
            for r in range(m):
                if side[r]:
                    order[li] = buf[r]
                    li += 1
                else:
                    order[ri] = buf[r]
                    ri += 1
            stack[top, 0], stack[top, 1] = lo, lo + n_left
            stack[top + 1, 0], stack[top + 1, 1] = lo + n_left, hi
            top += 2

    # 2. random candidates where the forest left a heap short
    for i in range(n):
        tries = 0
        while dist[i, 0] == np.inf and tries < 4 * k and n > 1:
            j = np.random.randint(n)
            if j != i:
                push(i, j, sqdist(i, j))
            tries += 1

    # 3. descent
    cand_new = np.empty((n, max_candidates), dtype=np.int32)
    pri_new = np.empty((n, max_candidates), dtype=np.float32)
    cand_old = np.empty((n, max_candidates), dtype=np.int32)
    pri_old = np.empty((n, max_candidates), dtype=np.float32)

    scratch = np.zeros((n, max_candidates), dtype=np.uint8)  # candidates carry no flag

    def offer(cand, pri, i, j, p):
        # keep the max_candidates lowest random priorities
        heap_push(pri, cand, scratch, i, p, j)

    for _ in range(n_iters):
        cand_new[:] = -1
        cand_old[:] = -1
        pri_new[:] = np.inf
        pri_old[:] = np.inf
        for i in range(n):
            for t in range(k):
                j = ind[i, t]
                if j < 0:
                    continue
                p = np.float32(np.random.random())
                if new[i, t]:
                    offer(cand_new, pri_new, i, j, p)
                    offer(cand_new, pri_new, j, i, p)
                else:
                    offer(cand_old, pri_old, i, j, p)
                    offer(cand_old, pri_old, j, i, p)
        # a sampled new neighbour is old from now on
        for i in range(n):
            for t in range(k):
                if new[i, t]:
                    j = ind[i, t]
                    for c in range(max_candidates):
                        if cand_new[i, c] == j:
                            new[i, t] = 0
                            break
        changed = 0
        for i in range(n):
            for a in range(max_candidates):
                p = cand_new[i, a]
                if p < 0:
                    continue
                for b in range(a + 1, max_candidates):
                    q = cand_new[i, b]
                    if q < 0:
                        continue
                    dd = sqdist(p, q)
                    if dd < dist[p, 0] or dd < dist[q, 0]:
                        changed += push(p, q, dd) + push(q, p, dd)
                for b in range(max_candidates):
                    q = cand_old[i, b]
                    if q < 0 or q == p:
                        continue
                    dd = sqdist(p, q)
                    if dd < dist[p, 0] or dd < dist[q, 0]:
                        changed += push(p, q, dd) + push(q, p, dd)
        if changed <= delta * k * n:
            break
    return ind, dist


def nn_descent(X: np.ndarray, k: int, *, n_trees: int = 8, max_candidates: int = 32,
               n_iters: int | None = None, leaf_size: int | None = None,
               random_state: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Approximate Euclidean kNN of the rows of ``X`` (self excluded), on one thread.

    Parameters
    ----------
    X
        (n, d) rows; copied to float32 C order when not already.
    k
        Neighbours per row; ``n > k`` is required.
    n_trees
        Random-projection trees of the initial candidates.
    max_candidates
        New and old candidates sampled per row and iteration.
    n_iters
        Iteration limit; default ``max(5, round(log2 n))``.
    leaf_size
        Largest leaf of a tree; default ``max(MIN_LEAF_SIZE, k + 1)``.
    random_state
        Seed; None draws one.

    Returns
    -------
    indices, distances
        (n, k) int64 and float32 (Euclidean), each row sorted ascending.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    n = X.shape[0]
    if n <= k:
        raise ValueError(f"nn_descent needs more than k={k} rows, got {n}")
    if n_iters is None:
        n_iters = max(5, int(round(np.log2(n))))
    if leaf_size is None:
        leaf_size = max(MIN_LEAF_SIZE, k + 1)
    seed = (np.random.SeedSequence(random_state).generate_state(1)[0] % (2**31 - 1))
    kernel = host_kernel(_descent, reassociate=True)
    ind, d2 = kernel(X, int(k), int(n_trees), int(leaf_size), int(max_candidates),
                     int(n_iters), float(DELTA), int(seed))
    order = np.argsort(d2, axis=1, kind="stable")
    ind = np.take_along_axis(ind, order, 1).astype(np.int64)
    dist = np.sqrt(np.take_along_axis(d2, order, 1))
    return ind, dist
