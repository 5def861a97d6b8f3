"""Integrity and structure checks of saved model directories (pumap_dask.model)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Any, Callable

import numpy as np
import pytest

import pumap_dask
from pumap_dask import ModelFileError
from pumap_dask.model import CONFIG_HASH, FORMAT_VERSION, config_sha256, read_config

CONFIG = "config.json"


@pytest.fixture(scope="module")
def pristine(fitted, tmp_path_factory) -> str:
    """One saved model, copied (never edited) by each test."""
    return fitted.save(tmp_path_factory.mktemp("pristine") / "model")


@pytest.fixture
def model_dir(pristine, tmp_path) -> str:
    """A private copy of the saved model that the test may edit."""
    return str(shutil.copytree(pristine, tmp_path / "model"))


def read_doc(path: str) -> Any:
    with open(os.path.join(path, CONFIG)) as f:
        return json.load(f)


def write_doc(path: str, doc: Any) -> None:
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(doc, f, indent=2)


def edit_config(path: str, edit: Callable[[dict], Any], mode: str = "plain") -> None:
    """Apply ``edit`` (in place) to config.json.

    ``mode``: "plain" keeps the recorded checksum (a hand edit), "rehash" recomputes it (an
    inconsistent document that passes the checksum), "v1" rewrites the file as format 1.
    """
    doc = read_doc(path)
    edit(doc)  # in place; the return value is ignored
    if mode == "rehash":
        doc[CONFIG_HASH] = config_sha256(doc)
    elif mode == "v1":
        doc.pop(CONFIG_HASH, None)
        doc["format_version"] = 1
    write_doc(path, doc)


def rehash_file(path: str, name: str, key: str) -> None:
    """Record ``name``'s current sha256 under ``key`` and re-seal config.json."""
    with open(os.path.join(path, name), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    edit_config(path, lambda d: d.__setitem__(key, digest), mode="rehash")


def assert_rejected(path: str, X: np.ndarray, match: str) -> None:
    """Both the estimator loader and the lazy transform refuse the directory."""
    with pytest.raises(ModelFileError, match=match):
        pumap_dask.load(path)
    with pytest.raises(ModelFileError, match=match):
        pumap_dask.transform(X, path)


def set_stat(doc: dict) -> None:
    doc["fitted"]["feature_stats"]["max"][0] = 1e9


EDITS = {
    "n_components": lambda d: d["params"].__setitem__("n_components", 3),
    "n_features_in": lambda d: d["fitted"].__setitem__("n_features_in", 15),
    "feature_stats": set_stat,
    "param_n_neighbors": lambda d: d["params"].__setitem__("n_neighbors", 7),
    "encoder_n_components": lambda d: d["encoder"].__setitem__("n_components", 3),
    "weights_sha256": lambda d: d.__setitem__("weights_sha256", "0" * 64),
}


# ---------------------------------------------------------------------- round trip
def test_roundtrip_is_exact(fitted, blobs, model_dir, caplog):
    X = blobs[1]
    with caplog.at_level(logging.WARNING, logger="pumap_dask"):
        m = pumap_dask.load(model_dir)
    assert not caplog.records
    doc = read_doc(model_dir)
    assert doc["format_version"] == FORMAT_VERSION == 2
    assert doc[CONFIG_HASH] == config_sha256(doc)
    np.testing.assert_array_equal(m.transform(X), fitted.transform(X))
    np.testing.assert_array_equal(pumap_dask.transform(X, model_dir).compute(),
                                  fitted.transform(X, refine=False))
    np.testing.assert_array_equal(m.embedding_, fitted.embedding_)
    assert m.get_params() == fitted.get_params()
    assert m.loss_history_ == fitted.loss_history_
    for k, v in fitted.feature_stats_.items():
        np.testing.assert_array_equal(m.feature_stats_[k], v)
    assert str(m) == str(fitted)
    # a loaded model re-saves to the same document, but for this save's own time
    again = read_doc(m.save(os.path.join(os.path.dirname(model_dir), "again")))
    assert again[CONFIG_HASH] == config_sha256(again)
    saved = [d["fitted"]["fit_record"].pop("saved") for d in (doc, again)]
    assert saved[0] <= saved[1]
    for d in (doc, again):
        d.pop(CONFIG_HASH)
    assert again == doc


def test_reformatted_config_still_loads(blobs, model_dir):
    """The checksum covers values, not the file's whitespace or key order."""
    doc = read_doc(model_dir)
    with open(os.path.join(model_dir, CONFIG), "w") as f:
        json.dump(dict(reversed(list(doc.items()))), f, indent=4)
    pumap_dask.load(model_dir)


# ---------------------------------------------------------------------- config edits
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_config_edit_detected(blobs, model_dir, edit):
    edit_config(model_dir, EDITS[edit])
    assert_rejected(model_dir, blobs[1], r"config\.json does not match the config_sha256.*"
                                         r"modified or corrupted.*re-save")


@pytest.mark.parametrize("edit, match", [
    ("n_components", r"params\['n_components'\] is 3 but the encoder outputs 2"),
    ("n_features_in", r"fitted\['n_features_in'\] is 15 but the encoder takes 16"),
    ("encoder_n_components", r"params\['n_components'\] is 2 but the encoder outputs 3"),
])
@pytest.mark.parametrize("mode", ["rehash", "v1"])
def test_inconsistent_config_rejected(blobs, model_dir, edit, match, mode):
    """Checks that hold even when the checksum matches, or for format 1 (no checksum)."""
    edit_config(model_dir, EDITS[edit], mode=mode)
    assert_rejected(model_dir, blobs[1], r"config\.json is invalid: " + match)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["fitted"]["feature_stats"]["mean"].pop(),
     r"feature_stats'\]\['mean'\] has 15 values but the model takes 16 features"),
    (lambda d: d["fitted"]["feature_stats"].pop("max"), r"feature_stats'\] lacks 'max'"),
    (lambda d: d["fitted"]["feature_stats"]["min"].__setitem__(0, "x"),
     r"\['min'\] must be a list of numbers"),
    (lambda d: d.pop("fitted"), r"the config lacks 'fitted'"),
    (lambda d: d.__setitem__("fitted", [1, 2]), r"\['fitted'\] must be an object"),
    (lambda d: d.pop("encoder"), r"the config lacks 'encoder'"),
    (lambda d: d.pop("params"), r"the config lacks 'params'"),
    (lambda d: d.pop("weights_sha256"), r"the config lacks 'weights_sha256'"),
    (lambda d: d["encoder"].__setitem__("hidden_layers", [32, -1]),
     r"encoder\['hidden_layers'\] must be a list of positive integers"),
    (lambda d: d["encoder"].__setitem__("n_features", "16"),
     r"encoder\['n_features'\] must be a positive integer"),
    (lambda d: d["encoder"].__setitem__("n_features", True),
     r"encoder\['n_features'\] must be a positive integer"),
    (lambda d: d["fitted"].pop("n_samples_fit"), r"fitted lacks 'n_samples_fit'"),
    (lambda d: d["fitted"].__setitem__("loss_history", None),
     r"fitted\['loss_history'\] must be a list of numbers"),
], ids=["stats_length", "stats_key", "stats_type", "no_fitted", "fitted_list", "no_encoder",
        "no_params", "no_weights_hash", "hidden_negative", "n_features_str",
        "n_features_bool", "no_n_samples", "loss_null"])
def test_malformed_config_rejected(blobs, model_dir, edit, match):
    edit_config(model_dir, edit, mode="rehash")
    assert_rejected(model_dir, blobs[1], r"config\.json is invalid: .*" + match
                    + r".*re-save")


@pytest.mark.parametrize("doc", [[1, 2, 3], "model", 42, None])
def test_config_not_an_object(blobs, model_dir, doc):
    write_doc(model_dir, doc)
    assert_rejected(model_dir, blobs[1], "top level must be a JSON object")


def test_training_range_reads_verified_config(model_dir):
    from pumap_dask.transform import training_range

    lo, hi = training_range(model_dir)
    assert lo.shape == hi.shape == (16,)
    edit_config(model_dir, set_stat)
    with pytest.raises(ModelFileError, match="modified or corrupted"):
        training_range(model_dir)


# ---------------------------------------------------------------------- format versions
def test_v1_loads_with_warning(fitted, blobs, model_dir, caplog):
    edit_config(model_dir, lambda d: None, mode="v1")
    with caplog.at_level(logging.WARNING, logger="pumap_dask"):
        m = pumap_dask.load(model_dir)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warned and "format version 1" in warned[0].getMessage()
    assert "re-save" in warned[0].getMessage()
    np.testing.assert_array_equal(m.transform(blobs[1]), fitted.transform(blobs[1]))
    np.testing.assert_array_equal(pumap_dask.transform(blobs[1], model_dir).compute(),
                                  fitted.transform(blobs[1], refine=False))
    # re-saving upgrades it
    m.save(model_dir)
    assert read_doc(model_dir)["format_version"] == FORMAT_VERSION
    assert CONFIG_HASH in read_doc(model_dir)


def test_v1_still_verifies_weights(blobs, model_dir):
    edit_config(model_dir, lambda d: None, mode="v1")
    with open(os.path.join(model_dir, "weights.pt"), "ab") as f:
        f.write(b"x")
    assert_rejected(model_dir, blobs[1], "sha256")


@pytest.mark.parametrize("version, match", [
    (99, r"newer pumap_dask \(format 99\); this version reads 1-2"),
    (0, r"older pumap_dask \(format 0\); this version reads 1-2"),
    ("2", r"'format_version' must be an integer"),
    (None, r"'format_version' must be an integer"),
])
def test_unknown_format_version(blobs, model_dir, version, match):
    edit_config(model_dir, lambda d: d.__setitem__("format_version", version), mode="rehash")
    assert_rejected(model_dir, blobs[1], match)


def test_v2_without_config_hash(blobs, model_dir):
    edit_config(model_dir, lambda d: d.pop(CONFIG_HASH))
    assert_rejected(model_dir, blobs[1], r"format 2 needs 'config_sha256'")


# ---------------------------------------------------------------------- weights, embedding
@pytest.mark.parametrize("damage", ["truncate", "overwrite", "append"])
def test_weights_edit_detected(blobs, model_dir, damage):
    wpath = os.path.join(model_dir, "weights.pt")
    size = os.path.getsize(wpath)
    with open(wpath, "r+b") as f:
        if damage == "truncate":
            f.truncate(size // 2)
        elif damage == "overwrite":
            f.seek(size // 2)
            f.write(b"garbage")
        else:
            f.seek(0, 2)
            f.write(b"x")
    assert_rejected(model_dir, blobs[1], r"weights\.pt (is missing or )?does not match the "
                                         r"sha256.*(modified|corrupt)")


def test_weights_of_another_architecture(blobs, model_dir):
    """Weights that pass their checksum but not the architecture in config.json."""
    import torch

    wpath = os.path.join(model_dir, "weights.pt")
    state = torch.load(wpath, weights_only=True)
    name = next(k for k in state if k.endswith("weight"))
    state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
    torch.save(state, wpath)
    rehash_file(model_dir, "weights.pt", "weights_sha256")
    with pytest.raises(ModelFileError, match=r"does not fit the encoder described in config"):
        pumap_dask.load(model_dir)
    with pytest.raises(ModelFileError, match=r"does not fit the encoder"):
        pumap_dask.transform(blobs[1], model_dir).compute(scheduler="sync")


def test_unreadable_weights(model_dir):
    with open(os.path.join(model_dir, "weights.pt"), "wb") as f:
        f.write(b"not a torch file")
    rehash_file(model_dir, "weights.pt", "weights_sha256")
    with pytest.raises(ModelFileError, match=r"cannot read .*weights\.pt"):
        pumap_dask.load(model_dir)


def test_embedding_edit_detected(model_dir):
    epath = os.path.join(model_dir, "embedding.npy")
    emb = np.load(epath)
    emb[0, 0] += 1.0
    np.save(epath, emb)
    with pytest.raises(ModelFileError, match=r"embedding\.npy does not match the sha256.*"
                                             r"modified or corrupted"):
        pumap_dask.load(model_dir)
    os.remove(epath)
    with pytest.raises(ModelFileError, match=r"embedding\.npy is missing"):
        pumap_dask.load(model_dir)


def test_embedding_of_wrong_shape(fitted, model_dir):
    epath = os.path.join(model_dir, "embedding.npy")
    np.save(epath, np.load(epath)[:-1])
    rehash_file(model_dir, "embedding.npy", "embedding_sha256")
    n = fitted.n_samples_fit_
    with pytest.raises(ModelFileError, match=rf"shape \({n - 1}, 2\).*shape \({n}, 2\)"):
        pumap_dask.load(model_dir)


def test_model_file_error_is_oserror():
    assert issubclass(ModelFileError, OSError)


def test_read_config_returns_validated_doc(pristine):
    doc = read_config(pristine)
    assert doc["encoder"]["n_features"] == doc["fitted"]["n_features_in"] == 16


# ---------------------------------------------------------------------- save target
def test_save_never_replaces_a_non_model(fitted, tmp_path):
    from pumap_dask.model import check_model_path

    other = tmp_path / "results"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ModelFileError, match=r"not a saved pumap_dask model.*keep\.txt"):
        fitted.save(other)
    assert (other / "keep.txt").read_text() == "x"
    a_file = tmp_path / "file.txt"
    a_file.write_text("y")
    with pytest.raises(ModelFileError, match="not a directory"):
        fitted.save(a_file)
    assert a_file.read_text() == "y"
    # absent, empty and existing model directories are fine
    (tmp_path / "empty").mkdir()
    for target in ("new", "empty", "new"):
        assert check_model_path(tmp_path / target) == str(tmp_path / target)
        fitted.save(tmp_path / target)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_activation_is_recorded_and_older_models_load_with_leaky_relu(blobs, tmp_path):
    """The encoder's activation is part of the saved architecture; a model saved before it
    was recorded (no ``activation`` key) is rebuilt with the LeakyReLU it was trained with."""
    X = blobs[1]
    tiny = dict(n_epochs=2, batch_size=256, hidden_layers=(8,), device="cpu")
    leaky = pumap_dask.ParametricUMAP(activation="leaky_relu", **tiny).fit(blobs[0])
    path = leaky.save(str(tmp_path / "leaky"))
    want = leaky.transform(X)
    assert read_doc(path)["encoder"]["activation"] == "leaky_relu"

    def old(d):
        d["encoder"].pop("activation")
        d["params"].pop("activation", None)

    edit_config(path, old, mode="rehash")
    older = pumap_dask.load(path)
    assert older.activation == "leaky_relu"  # not the new default
    np.testing.assert_array_equal(older.transform(X), want)
    np.testing.assert_array_equal(pumap_dask.transform(X, path).compute(), want)

    silu = pumap_dask.ParametricUMAP(**tiny).fit(blobs[0])
    assert silu.activation == "silu"  # the default
    path = silu.save(str(tmp_path / "silu"))
    back = pumap_dask.load(path)
    assert back.activation == "silu" and type(back.encoder_.mlp[1]).__name__ == "SiLU"
    np.testing.assert_array_equal(back.transform(X), silu.transform(X))
    np.testing.assert_array_equal(pumap_dask.transform(X, path).compute(), silu.transform(X))
    edit_config(path, lambda d: d["encoder"].__setitem__("activation", "tanh"), mode="rehash")
    assert_rejected(path, X, r"activation")
