"""Custom encoder/decoder networks, n-D input, reconstruction and inverse_transform."""

from __future__ import annotations

import json
import os

import dask.array as da
import numpy as np
import pytest
import torch
from sklearn.base import clone

import pumap_dask
from pumap_dask import InputError, ModelFileError, NotFittedError, ParametricUMAP
from pumap_dask import networks, reconstruction
from pumap_dask.model import CONFIG_HASH, DECODER, config_sha256
from tests import nets_for_tests

FAST = dict(n_epochs=8, batch_size=1024, hidden_layers=(32, 32), device="cpu", random_state=0)
ENC = "tests.nets_for_tests:make_encoder"
# the factories a caller allows when loading (a model file never makes load import them)
NETS = {ENC: nets_for_tests.make_encoder,
        "tests.nets_for_tests:make_conv_encoder": nets_for_tests.make_conv_encoder,
        "tests.nets_for_tests:make_image_decoder": nets_for_tests.make_image_decoder}


@pytest.fixture(scope="module")
def digits_split():
    from sklearn.datasets import load_digits

    X = load_digits().data.astype(np.float32)
    return X[:600], X[1400:1700]  # train, held out


def _edit(path, edit) -> None:
    """Edit config.json and re-seal its checksum (a consistent-looking document)."""
    cfg = os.path.join(path, "config.json")
    with open(cfg) as f:
        doc = json.load(f)
    edit(doc)
    doc[CONFIG_HASH] = config_sha256(doc)
    with open(cfg, "w") as f:
        json.dump(doc, f)


# --------------------------------------------------------------------------- custom encoders
@pytest.fixture(scope="module")
def named_fit(digits_split):
    """Fitted with the factory given by its importable name."""
    return ParametricUMAP(encoder=ENC, **FAST).fit(digits_split[0])


def test_factory_name_fit_save_load(named_fit, digits_split, tmp_path):
    Xtr, Xte = digits_split
    assert isinstance(named_fit.encoder_, networks.CustomEncoder)
    assert named_fit.embedding_.shape == (len(Xtr), 2)
    assert np.isfinite(named_fit.embedding_).all()
    path = named_fit.save(tmp_path / "m")
    with open(os.path.join(path, "config.json")) as f:
        doc = json.load(f)
    assert doc["encoder"]["factory"] == ENC and doc["encoder"]["factory_arg"] == 64
    assert doc["params"]["encoder"] == ENC
    loaded = pumap_dask.load(path, networks=NETS)
    assert loaded.encoder == ENC
    np.testing.assert_array_equal(loaded.transform(Xte), named_fit.transform(Xte))
    # the lazy transform ships the loaded (or in-memory) module; a bare path is refused
    lazy = pumap_dask.transform(da.from_array(Xte, chunks=(100, 64)), loaded).compute()
    np.testing.assert_allclose(lazy, named_fit.transform(Xte, refine=False), atol=1e-6)
    lazy2 = named_fit.transform(da.from_array(Xte, chunks=(100, 64))).compute()
    np.testing.assert_allclose(lazy2, named_fit.transform(Xte, refine=False), atol=1e-6)


def test_callable_factory_is_saved_by_name(digits_split, tmp_path):
    Xtr, Xte = digits_split
    m = ParametricUMAP(encoder=nets_for_tests.make_encoder, **FAST).fit(Xtr[:300])
    loaded = pumap_dask.load(m.save(tmp_path / "m"), networks=NETS)
    assert loaded.encoder == ENC  # the function's importable name
    np.testing.assert_array_equal(loaded.transform(Xte), m.transform(Xte))


def test_module_instance_trains_a_copy_and_refuses_save(digits_split, tmp_path):
    Xtr, Xte = digits_split
    net = nets_for_tests.make_encoder(64)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    m = ParametricUMAP(encoder=net, **FAST).fit(Xtr[:300])
    assert m.encoder is net  # the parameter is untouched (sklearn convention)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert m.transform(Xte).shape == (len(Xte), 2)
    # lazy transform of an in-memory module without factory: shipped as the module
    lazy = m.transform(da.from_array(Xte, chunks=(100, 64))).compute()
    np.testing.assert_allclose(lazy, m.transform(Xte, refine=False), atol=1e-6)
    with pytest.raises(networks.NetworkError, match=r"importable factory name.*mypkg\.nets"):
        m.save(tmp_path / "m")
    assert not os.path.exists(tmp_path / "m")  # nothing written


def test_module_built_by_named_factory_saves(digits_split, tmp_path):
    Xtr, Xte = digits_split
    net = networks.build(ENC, 64)
    m = ParametricUMAP(encoder=net, **FAST).fit(Xtr[:300])
    loaded = pumap_dask.load(m.save(tmp_path / "m"), networks=NETS)
    np.testing.assert_array_equal(loaded.transform(Xte), m.transform(Xte))


def test_lambda_factory_fits_but_cannot_be_saved(digits_split, tmp_path):
    m = ParametricUMAP(encoder=lambda d: nets_for_tests.make_encoder(d), **FAST)
    m.fit(digits_split[0][:300])
    with pytest.raises(networks.NetworkError, match="importable factory name"):
        m.save(tmp_path / "m")


def test_a_model_file_never_runs_the_code_it_names(named_fit, tmp_path, monkeypatch):
    """load/transform/info never import or call a factory named in config.json; only the
    factories the caller passes are used (issue 17: "os:_exit" ended the process)."""
    path = named_fit.save(tmp_path / "m")
    with pytest.raises(ModelFileError, match=r"custom network factory "
                                             r"'tests.nets_for_tests:make_encoder'.*"
                                             r"networks=.*--allow-network"):
        pumap_dask.load(path)
    with pytest.raises(ModelFileError, match="networks="):
        pumap_dask.transform(np.zeros((3, 64), np.float32), path)
    calls = []
    monkeypatch.setattr(os, "_exit", lambda *a: calls.append(a))
    # a hostile edit: the checksum is recomputed, so only the rule protects the reader
    _edit(path, lambda d: d["encoder"].__setitem__("factory", "os:_exit"))
    for attempt in (lambda: pumap_dask.load(path), lambda: pumap_dask.load(path, networks=NETS),
                    lambda: pumap_dask.transform(np.zeros((3, 64), np.float32), path)):
        with pytest.raises(ModelFileError, match="'os:_exit'"):
            attempt()
    assert not calls
    from pumap_dask.report import model_summary  # info describes it without building it
    assert model_summary(path)["model_dir"] == os.path.abspath(path)
    assert not calls


def test_the_allowed_factory_fails_cleanly(named_fit, tmp_path):
    path = named_fit.save(tmp_path / "m")

    def broken(_arg):
        raise RuntimeError("boom")

    with pytest.raises(ModelFileError, match="failed when called with 64.*boom"):
        pumap_dask.load(path, networks={ENC: broken})


def test_bad_networks_fail_before_training(digits_split):
    X = digits_split[0][:200]
    with pytest.raises(networks.NetworkError, match=r"expected 3 values per row"):
        ParametricUMAP(encoder=ENC, n_components=3, **{**FAST, "n_epochs": 1}).fit(X)
    with pytest.raises(networks.NetworkError, match="not a torch.nn.Module"):
        ParametricUMAP(encoder=lambda d: 42, **FAST).fit(X)
    with pytest.raises(networks.NetworkError, match="cannot import module"):
        ParametricUMAP(encoder="no_such_pkg:make", **FAST).fit(X)
    with pytest.raises(ValueError, match="encoder must be None, a torch.nn.Module"):
        ParametricUMAP(encoder=3).fit(X)


def test_clone_and_get_params_keep_networks():
    net = nets_for_tests.make_encoder(64)
    m = ParametricUMAP(encoder=net, decoder=ENC, parametric_reconstruction=True)
    params = m.get_params()
    assert params["encoder"] is net and params["decoder"] == ENC
    c = clone(m)
    assert isinstance(c.encoder, torch.nn.Module) and c.encoder is not net
    assert c.decoder == ENC and c.parametric_reconstruction is True


# --------------------------------------------------------------------------- n-D input
@pytest.fixture(scope="module")
def conv_fit(digits_split):
    """Digits as 8 x 8 images with a small conv encoder."""
    return ParametricUMAP(encoder="tests.nets_for_tests:make_conv_encoder",
                          **FAST).fit(digits_split[0].reshape(-1, 8, 8))


def test_images_with_a_conv_encoder(conv_fit, digits_split, tmp_path):
    Xtr, Xte = digits_split
    assert conv_fit.input_shape_ == (8, 8) and conv_fit.n_features_in_ == 64
    imgs = Xte.reshape(-1, 8, 8)
    Z = conv_fit.transform(imgs)
    assert Z.shape == (len(Xte), 2) and np.isfinite(Z).all()
    np.testing.assert_array_equal(conv_fit.transform(Xte), Z)  # flattened rows work too
    with pytest.raises(InputError, match=r"shape \(4, 16\).*fitted on samples of shape"):
        conv_fit.transform(Xte.reshape(-1, 4, 16))
    path = conv_fit.save(tmp_path / "m")
    loaded = pumap_dask.load(path, networks=NETS)
    assert loaded.input_shape_ == (8, 8)
    np.testing.assert_array_equal(loaded.transform(imgs), Z)
    lazy = pumap_dask.transform(da.from_array(Xte, chunks=(150, 64)), loaded).compute()
    np.testing.assert_allclose(lazy, conv_fit.transform(imgs, refine=False), atol=1e-5)


def test_default_encoder_flattens_nd_input(digits_split):
    X = digits_split[0][:300]
    flat = ParametricUMAP(**FAST).fit(X)
    imgs = ParametricUMAP(**FAST).fit(X.reshape(-1, 8, 8))
    np.testing.assert_array_equal(imgs.embedding_, flat.embedding_)
    np.testing.assert_array_equal(imgs.transform(X.reshape(-1, 8, 8)[:20]),
                                  flat.transform(X[:20]))


def test_lazy_nd_input_is_refused_clearly(digits_split):
    X = da.from_array(digits_split[0][:200].reshape(-1, 8, 8), chunks=(100, 8, 8))
    with pytest.raises(InputError, match="n-D input .* numpy array only"):
        ParametricUMAP(**FAST).fit(X)


# --------------------------------------------------------------------------- reconstruction
@pytest.fixture(scope="module")
def recon_fit(digits_split):
    Xtr, Xte = digits_split
    m = ParametricUMAP(parametric_reconstruction=True, **{**FAST, "n_epochs": 15})
    return m.fit(Xtr, validation_data=Xte)


def test_reconstruction_lowers_held_out_error(recon_fit, digits_split):
    Xtr, Xte = digits_split
    val = recon_fit.validation_reconstruction_
    assert len(val) == len(recon_fit.reconstruction_history_) == recon_fit.n_epochs_run_
    untrained = networks.build_decoder(None, (64,), 2, "mse", (32, 32), Xtr, seed=0)
    err0 = reconstruction.reconstruction_error(recon_fit.encoder_, untrained, Xte)
    variance = float(Xte.var(0).mean())  # the error of predicting the held-out mean
    rec = recon_fit.inverse_transform(recon_fit.transform(Xte, refine=False))
    err = float(((rec - Xte) ** 2).mean())
    assert err == pytest.approx(val[-1], rel=1e-4)
    assert err < 0.75 * variance < err0, (err, variance, err0)
    assert val[-1] < val[0]
    assert recon_fit.reconstruction_history_[-1] < recon_fit.reconstruction_history_[0]


def test_decoder_without_autoencoder_loss_leaves_the_embedding(recon_fit, digits_split):
    plain = ParametricUMAP(**{**FAST, "n_epochs": 15}).fit(digits_split[0])
    np.testing.assert_allclose(recon_fit.embedding_, plain.embedding_, atol=1e-5)


def test_inverse_transform_numpy_and_lazy_agree(recon_fit, digits_split):
    Z = recon_fit.transform(digits_split[1])
    out = recon_fit.inverse_transform(Z)
    assert out.shape == (len(Z), 64) and out.dtype == np.float32
    lazy = recon_fit.inverse_transform(da.from_array(Z, chunks=(70, 2)))
    assert isinstance(lazy, da.Array) and lazy.chunks[0] == da.from_array(Z, chunks=(70, 2)).chunks[0]
    np.testing.assert_allclose(lazy.compute(), out, atol=1e-5)
    with pytest.raises(InputError, match="3 columns"):
        recon_fit.inverse_transform(np.zeros((2, 3)))


def test_decoder_save_load_round_trip(recon_fit, digits_split, tmp_path):
    path = recon_fit.save(tmp_path / "m")
    assert os.path.isfile(os.path.join(path, DECODER))
    loaded = pumap_dask.load(path)
    Z = recon_fit.transform(digits_split[1])
    np.testing.assert_array_equal(loaded.inverse_transform(Z), recon_fit.inverse_transform(Z))
    assert loaded.validation_reconstruction_ == pytest.approx(
        recon_fit.validation_reconstruction_)
    # decoder.pt is checksummed like weights.pt
    with open(os.path.join(path, DECODER), "ab") as f:
        f.write(b"x")
    with pytest.raises(ModelFileError, match="decoder was modified or corrupted"):
        pumap_dask.load(path)
    os.remove(os.path.join(path, DECODER))
    with pytest.raises(ModelFileError, match="decoder.pt is missing"):
        pumap_dask.load(path)


def test_models_without_decoder_load(fitted, tmp_path):
    path = fitted.save(tmp_path / "m")
    assert not os.path.exists(os.path.join(path, DECODER))

    def as_old(doc):  # a model saved before these keys existed
        for key in ("input_shape", "reconstruction_history", "validation_reconstruction"):
            doc["fitted"].pop(key, None)
        for key in ("encoder", "decoder", "parametric_reconstruction",
                    "parametric_reconstruction_loss_weight", "reconstruction_loss",
                    "autoencoder_loss"):
            doc["params"].pop(key, None)

    _edit(path, as_old)
    loaded = pumap_dask.load(path)
    assert loaded.encoder is None and not hasattr(loaded, "decoder_")
    X = np.random.default_rng(0).normal(size=(5, fitted.n_features_in_)).astype(np.float32)
    np.testing.assert_array_equal(loaded.transform(X), fitted.transform(X))
    with pytest.raises(NotFittedError, match="parametric_reconstruction=True"):
        loaded.inverse_transform(np.zeros((2, 2)))


def test_custom_decoder_images_and_bce(digits_split, tmp_path):
    imgs = (digits_split[0][:300] / 16.0).reshape(-1, 8, 8)
    m = ParametricUMAP(encoder="tests.nets_for_tests:make_conv_encoder",
                       decoder="tests.nets_for_tests:make_image_decoder",
                       parametric_reconstruction=True, reconstruction_loss="bce",
                       **FAST).fit(imgs)
    out = m.inverse_transform(m.transform(imgs[:10]))
    assert out.shape == (10, 8, 8) and (out >= 0).all() and (out <= 1).all()
    lazy = m.inverse_transform(da.from_array(m.transform(imgs[:10]), chunks=(5, 2)))
    assert lazy.shape == (10, 8, 8)
    np.testing.assert_allclose(lazy.compute(), out, atol=1e-5)
    loaded = pumap_dask.load(m.save(tmp_path / "m"), networks=NETS)
    assert loaded.decoder == "tests.nets_for_tests:make_image_decoder"
    np.testing.assert_array_equal(loaded.inverse_transform(m.transform(imgs[:10])), out)
    with pytest.raises(networks.NetworkError, match=r"bce.*needs data in \[0, 1\]"):
        ParametricUMAP(parametric_reconstruction=True, reconstruction_loss="bce",
                       **FAST).fit(digits_split[0][:200])


def test_reconstruction_parameter_errors(digits_split):
    X, Xv = digits_split[0][:200], digits_split[1][:50]
    with pytest.raises(InputError, match="needs parametric_reconstruction=True"):
        ParametricUMAP(**FAST).fit(X, validation_data=Xv)
    with pytest.raises(InputError, match="validation_data has shape"):
        ParametricUMAP(parametric_reconstruction=True, **FAST).fit(X, validation_data=Xv[:, :10])
    with pytest.raises(ValueError, match="reconstruction_loss must be one of"):
        ParametricUMAP(parametric_reconstruction=True, reconstruction_loss="l1").fit(X)
    with pytest.raises(ValueError, match="train_world_size=2 cannot be used with parametric_r"):
        ParametricUMAP(parametric_reconstruction=True, train_world_size=2).fit(X)
    with pytest.raises(ValueError, match="train_world_size=2 cannot be used with custom netw"):
        ParametricUMAP(encoder=ENC, train_world_size=2).fit(X)


def test_autoencoder_loss_reaches_the_encoder(recon_fit, digits_split):
    Xtr, Xte = digits_split
    m = ParametricUMAP(parametric_reconstruction=True, autoencoder_loss=True,
                       **{**FAST, "n_epochs": 15}).fit(Xtr, validation_data=Xte)
    assert np.isfinite(m.embedding_).all()
    assert np.abs(m.embedding_ - recon_fit.embedding_).max() > 1e-3  # the encoder moved
    assert m.validation_reconstruction_[-1] < float(Xte.var(0).mean())
