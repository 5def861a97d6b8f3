"""GPU code paths; skipped without CUDA (their CPU fallbacks are covered elsewhere)."""

import importlib

import numpy as np
import pytest
import torch

import pumap_dask
from pumap_dask.knn import exact_knn
from pumap_dask.params import resolve_device

from .conftest import FAST

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_request_falls_back_to_cpu_without_gpu(blobs):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device("cuda") == "cpu"
    assert resolve_device("auto") == "cpu"
    m = pumap_dask.ParametricUMAP(**{**FAST, "device": "cuda"}).fit(blobs[0])
    assert np.isfinite(m.embedding_).all()


@pytest.mark.gpu
@cuda
def test_exact_knn_cuda_matches_cpu(digits):
    X = digits[0]
    ci, cd = exact_knn(X, 10, device="cpu")
    gi, gd = exact_knn(X, 10, device="cuda")
    np.testing.assert_allclose(gd, cd, rtol=1e-3, atol=1e-3)
    assert (gi == ci).mean() > 0.99


@pytest.mark.gpu
@cuda
def test_fit_and_transform_cuda(blobs):
    m = pumap_dask.ParametricUMAP(**{**FAST, "device": "cuda"}).fit(blobs[0])
    cpu = m.transform(blobs[1], refine=False)
    lazy = pumap_dask.transform(blobs[1], m, device="cuda").compute()
    assert np.abs(lazy - cpu).max() < 1e-3


# --------------------------------------------------------------------------- bf16
def test_bf16_on_cpu_warns_and_trains_in_fp32(blobs, caplog):
    """precision='bf16' without CUDA: a warning, and bitwise the fp32 result."""
    import logging

    caplog.set_level(logging.WARNING, logger="pumap_dask")
    kw = dict(random_state=3, init="random", **FAST)
    a = pumap_dask.ParametricUMAP(**kw).fit(blobs[0])
    b = pumap_dask.ParametricUMAP(precision="bf16", **kw).fit(blobs[0])
    assert "precision='bf16' autocasts on CUDA only" in caplog.text
    np.testing.assert_array_equal(a.embedding_, b.embedding_)


def test_precision_is_validated():
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16'\)"):
        pumap_dask.ParametricUMAP(precision="fp16").fit(np.zeros((50, 3), np.float32))


def test_saved_models_load_with_and_without_precision(fitted, tmp_path):
    import json

    from pumap_dask.model import CONFIG, config_sha256

    m = pumap_dask.ParametricUMAP(**{**fitted.get_params(), "precision": "bf16"})
    m.__dict__.update({k: v for k, v in fitted.__dict__.items() if k.endswith("_")})
    path = m.save(tmp_path / "with")
    assert pumap_dask.load(path).precision == "bf16"
    # a model saved before the parameter existed: no "precision" key at all
    cfg = tmp_path / "with" / CONFIG
    doc = json.loads(cfg.read_text())
    del doc["params"]["precision"]
    doc["config_sha256"] = config_sha256(doc)
    cfg.write_text(json.dumps(doc))
    assert pumap_dask.load(path).precision == "fp32"


# --------------------------------------------------------------------------- CuPy chunks
class _FakeCupyArray(np.ndarray):
    """A numpy array that passes for CuPy once ``is_cupy`` is patched (CPU stand-in;
    a type whose module is "cupy" would make dask import the real CuPy)."""


def _fake_cupy():
    from types import SimpleNamespace

    def view(a):
        return np.asarray(a).view(_FakeCupyArray)

    return SimpleNamespace(asarray=view, from_dlpack=lambda t: view(np.from_dlpack(t)),
                           empty=lambda shape, dtype: view(np.empty(shape, dtype)))


def test_cupy_code_path_with_a_cpu_stand_in(fitted, blobs, monkeypatch):
    """The CuPy branches of transform and training, run on the CPU with a numpy subclass
    posing as CuPy (DLPack into torch, CuPy out): same results as the numpy path."""
    import dask
    import dask.array as da

    tr = importlib.import_module("pumap_dask.transform")  # the module, not the function
    from pumap_dask.train import TrainConfig, build_encoder, train_encoder

    def is_cupy(x):
        return isinstance(x, _FakeCupyArray)

    monkeypatch.setattr(tr, "cupy_module", _fake_cupy)
    for name in ("arrays", "transform", "train", "inputs", "refine"):  # every user of is_cupy
        mod = importlib.import_module(f"pumap_dask.{name}")
        if hasattr(mod, "is_cupy"):
            monkeypatch.setattr(mod, "is_cupy", is_cupy)
    X = blobs[1]
    fake = X.view(_FakeCupyArray)
    assert is_cupy(fake) and not is_cupy(X)
    darr = da.from_array(fake, chunks=(50, X.shape[1]), asarray=False)
    with dask.config.set(scheduler="threads"):
        lazy = tr.transform(darr, fitted, device="cpu")
        assert is_cupy(lazy._meta)
        blocks = [b.compute() for b in lazy.to_delayed().ravel()]
        out = lazy.compute()
        mask = tr.ood_mask(darr, fitted).compute()
    assert all(is_cupy(b) for b in blocks)  # (numpy's concatenate drops the stand-in type)
    np.testing.assert_allclose(np.asarray(out), fitted.transform(X, refine=False), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(mask), tr.ood_mask(X, fitted).compute())
    bad = X.copy()
    bad[3] = np.nan
    with pytest.raises(Exception, match=r"NaN or infinite values in 1 rows .*first: \[3\]"):
        tr.transform_block(bad.view(_FakeCupyArray), tr.model_source(fitted), device="cpu")
    nan_out = tr.transform_block(bad.view(_FakeCupyArray), tr.model_source(fitted),
                                 device="cpu", nan_policy="nan")
    assert np.isnan(nan_out[3]).all() and np.isfinite(np.delete(nan_out, 3, 0)).all()

    Xtr = blobs[0]
    head = np.arange(len(Xtr) - 1, dtype=np.int32)
    tail = head + 1
    w = np.ones(len(head), np.float32)
    cfg = TrainConfig(n_epochs=2, batch_size=128, hidden_layers=(16,), init_steps=0)
    e1, _ = train_encoder(Xtr, head, tail, w, cfg, build_encoder(Xtr.shape[1], cfg, Xtr))
    fake_tr = Xtr.view(_FakeCupyArray)
    e2, _ = train_encoder(fake_tr, head, tail, w, cfg, build_encoder(Xtr.shape[1], cfg, fake_tr))
    for k, v in e1.state_dict().items():
        assert torch.equal(v, e2.state_dict()[k]), k


def _cupy_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return pytest.importorskip("cupy")


@pytest.mark.gpu
@cuda
def test_transform_of_cupy_chunks_stays_on_the_gpu(fitted, blobs):
    cp = _cupy_or_skip()
    import dask.array as da

    tr = importlib.import_module("pumap_dask.transform")  # the module, not the function

    X = blobs[1]
    darr = da.from_array(cp.asarray(X), chunks=(50, X.shape[1]), asarray=False)
    lazy = tr.transform(darr, fitted, device="cuda")
    assert isinstance(lazy._meta, cp.ndarray)
    blocks = lazy.to_delayed().ravel()
    first = blocks[0].compute(scheduler="threads")
    assert isinstance(first, cp.ndarray) and first.device.id == 0
    out = lazy.compute(scheduler="threads")
    assert isinstance(out, cp.ndarray)
    np.testing.assert_allclose(cp.asnumpy(out), fitted.transform(X, refine=False), atol=1e-3)


@pytest.mark.gpu
@cuda
def test_training_from_cupy_rows_matches_numpy_rows(blobs):
    cp = _cupy_or_skip()
    from pumap_dask.train import TrainConfig, build_encoder, train_encoder

    Xtr = blobs[0]
    head = np.arange(len(Xtr) - 1, dtype=np.int32)
    tail = head + 1
    w = np.ones(len(head), np.float32)
    cfg = TrainConfig(n_epochs=2, batch_size=128, hidden_layers=(16,), init_steps=0,
                      device="cuda")
    e1, _ = train_encoder(Xtr, head, tail, w, cfg, build_encoder(Xtr.shape[1], cfg, Xtr))
    Xg = cp.asarray(Xtr)
    e2, _ = train_encoder(Xg, head, tail, w, cfg, build_encoder(Xtr.shape[1], cfg, Xg))
    for k, v in e1.state_dict().items():
        torch.testing.assert_close(v, e2.state_dict()[k], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@cuda
def test_bf16_training_on_cuda(blobs):
    from sklearn.neighbors import KNeighborsClassifier

    Xtr, Xte, ytr, yte = blobs
    accs = {}
    for precision in ("fp32", "bf16"):
        m = pumap_dask.ParametricUMAP(**{**FAST, "device": "cuda"}, precision=precision,
                                      random_state=3).fit(Xtr)
        assert np.isfinite(m.embedding_).all()
        assert all(v.dtype == torch.float32 for v in m.encoder_.state_dict().values()
                   if v.is_floating_point())
        knn = KNeighborsClassifier(15).fit(m.embedding_, ytr)
        accs[precision] = knn.score(m.transform(Xte), yte)
    assert accs["bf16"] > accs["fp32"] - 0.05, accs


def test_fit_takes_cupy_input_through_host_memory():
    """fit's kNN and graph stages run on the host: CuPy input (an array or dask chunks) is
    copied there (``.get()``) and the fit equals the numpy fit (a numpy subclass from a
    module named cupy, with CuPy's ``get``, stands in for CuPy on the CPU)."""
    import dask
    import dask.array as da

    from pumap_dask import ParametricUMAP

    class FakeCupy(np.ndarray):
        def get(self):
            return np.asarray(self).view(np.ndarray)

        def __array__(self, *args, **kwargs):  # CuPy refuses implicit host conversion
            raise TypeError("Implicit conversion to a NumPy array is not allowed")

    FakeCupy.__module__ = "cupy._core.core"
    X = np.random.default_rng(0).normal(size=(120, 4)).astype(np.float32)
    params = dict(n_neighbors=5, n_epochs=3, hidden_layers=(8,), device="cpu",
                  random_state=0)
    ref = ParametricUMAP(**params).fit(X)
    got = ParametricUMAP(**params).fit(X.view(FakeCupy))
    np.testing.assert_array_equal(got.embedding_, ref.embedding_)
    # dask chunks of CuPy type (one block: concatenating them would import real CuPy)
    fake = X.view(FakeCupy)
    lazy = da.from_delayed(dask.delayed(fake), X.shape, np.float32, meta=fake[:0])
    assert type(lazy._meta).__module__.startswith("cupy")
    with dask.config.set(scheduler="threads"):
        fit = ParametricUMAP(**params).fit(lazy)
    np.testing.assert_allclose(fit.embedding_, ref.embedding_, atol=1e-5)