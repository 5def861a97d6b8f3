"""Model files: the directory format of a saved model, written and read safely.

The network and its forward pass are :mod:`pumap_dask.encoder`'s; the estimator's fitted
state on top of these files is :mod:`pumap_dask.state`'s.

A saved model is a directory::

    model/
      config.json     parameters, encoder architecture, metadata, sha256 of the weights,
                      of the embedding and of config.json itself
      weights.pt      the encoder's state_dict (tensors only; loaded with weights_only=True)
      embedding.npy   the training embedding (optional; loaded with allow_pickle=False)
      decoder.pt      the decoder's state_dict (optional: parametric_reconstruction=True)

A custom encoder or decoder (see :mod:`pumap_dask.networks`) is stored as its state_dict
plus, in ``config.json``, its factory's importable name and the argument it was called
with; loading imports the factory, calls it and loads the state dict (no pickle).

The directory is written to a temporary sibling and renamed into place, so a crash never
leaves a half-written model behind.

Every file is integrity-checked on load: ``config.json`` carries ``config_sha256``, the
sha256 of its own canonical JSON (:func:`config_sha256`), and the sha256 of the other two
files. :func:`read_config` verifies that checksum and the document's structure and
internal consistency (:func:`validate_config`), so every reader (the estimator, the lazy
transform, ``training_range``) gets a config it can trust or a :class:`ModelFileError`
that says what is wrong.

Format versions: 1 (the first release) had no ``config_sha256``; such directories still
load, with a warning to re-save them. 2 is written now.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Mapping, NoReturn

import numpy as np
import torch

from .encoder import Encoder, encoder_spec
from .errors import ModelFileError, NetworkError, TrainingError
from .io import apply_umask
from .networks import decoder_from_spec, encoder_from_spec
from .params import ACTIVATIONS, METRICS, writable_location

logger = logging.getLogger(__name__)


FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG = "config.json"
WEIGHTS = "weights.pt"
EMBEDDING = "embedding.npy"
DECODER = "decoder.pt"
CONFIG_HASH = "config_sha256"
FEATURE_STATS = ("min", "max", "mean", "std")
_FIX = ("re-save it from the fitted estimator (ParametricUMAP.save) or re-fit the model")
MAX_DIM = 2 ** 31 - 1  # largest layer width / feature count an encoder spec may state
_WARNED_V1: set[str] = set()


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_sha256(doc: dict[str, Any]) -> str:
    """Hex sha256 of a config document's canonical JSON, without its ``config_sha256`` field.

    The canonical form is ``json.dumps(doc, sort_keys=True, separators=(",", ":"))``, so
    the checksum ignores the file's indentation and key order but no value.

    Parameters
    ----------
    doc
        The parsed ``config.json``.

    Returns
    -------
    str
        64 hex digits.
    """
    body = {k: v for k, v in doc.items() if k != CONFIG_HASH}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------- validation
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _pos_int(v: Any) -> bool:
    return _is_int(v) and v >= 1


def _nonneg_int(v: Any) -> bool:
    return _is_int(v) and v >= 0


def _dim(v: Any) -> bool:
    return _pos_int(v) and v <= MAX_DIM


def _pos_int_list(v: Any) -> bool:
    return isinstance(v, list) and all(_pos_int(h) for h in v)


def _dim_list(v: Any) -> bool:
    return isinstance(v, list) and all(_dim(h) for h in v)


def _number_list(v: Any) -> bool:
    return isinstance(v, list) and all(_is_number(x) for x in v)


def _sha256_str(v: Any) -> bool:
    return (isinstance(v, str) and len(v) == 64
            and all(c in "0123456789abcdef" for c in v))


def _invalid(cfg_path: str, problem: str) -> NoReturn:
    raise ModelFileError(f"{cfg_path} is invalid: {problem}; the model was modified or "
                         f"corrupted (or was not written by pumap_dask): {_FIX}")


def _require(block: dict[str, Any], key: str, ok: Any, expected: str, where: str,
             cfg_path: str, optional: bool = False) -> Any:
    """``block[key]`` if present and ``ok(value)``; else a ModelFileError (or None)."""
    if key not in block:
        if optional:
            return None
        _invalid(cfg_path, f"{where} lacks {key!r}")
    value = block[key]
    if not ok(value):
        _invalid(cfg_path, f"{where}[{key!r}] must be {expected}, got {_short(value)}")
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_network_block(block: dict[str, Any], where: str, n_features: int,
                         cfg_path: str) -> None:
    """The factory fields of a custom encoder or decoder block."""
    _require(block, "factory", lambda v: isinstance(v, str) and bool(v),
             "a factory name 'package.module:function'", where, cfg_path)
    _require(block, "factory_arg", lambda v: _dim(v) or (_dim_list(v) and bool(v)),
             "a positive integer or a list of them", where, cfg_path)
    shape = _require(block, "input_shape", lambda v: _dim_list(v) and bool(v),
                     "a non-empty list of positive integers", where, cfg_path)
    if int(np.prod(shape, dtype=np.int64)) != n_features:
        _invalid(cfg_path, f"{where}['input_shape'] {shape} does not hold {n_features} "
                           "features")


def validate_config(doc: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Check a model config's structure and internal consistency.

    Every field a reader uses is present with the right type, and the fields that
    describe the same thing agree: ``fitted.n_features_in == encoder.n_features``,
    ``params.n_components == encoder.n_components``, ``params.hidden_layers ==
    encoder.hidden_layers``, and each ``fitted.feature_stats`` array has one value per
    feature. The checksum and format version are :func:`read_config`'s business.

    Parameters
    ----------
    doc
        The parsed ``config.json`` (any JSON value).
    path
        The model directory, named in error messages.

    Returns
    -------
    dict
        ``doc``, unchanged.

    Raises
    ------
    ModelFileError
        Naming the first problem found and how to fix it.
    """
    cfg_path = os.path.join(os.fspath(path), CONFIG)
    if not isinstance(doc, dict):
        _invalid(cfg_path, f"the top level must be a JSON object, got a "
                           f"{type(doc).__name__}")
    is_dict = lambda v: isinstance(v, dict)  # noqa: E731
    _require(doc, "weights_sha256", _sha256_str, "a sha256 hex string", "the config",
             cfg_path)
    _require(doc, "embedding_sha256", _sha256_str, "a sha256 hex string", "the config",
             cfg_path, optional=True)
    _require(doc, "training_data_sha256", _sha256_str, "a sha256 hex string", "the config",
             cfg_path, optional=True)  # only with save(..., include_training_data=True)

    enc = _require(doc, "encoder", is_dict, "an object", "the config", cfg_path)
    n_features = _require(enc, "n_features", _dim, "a positive integer", "encoder",
                          cfg_path)
    n_components = _require(enc, "n_components", _dim, "a positive integer", "encoder",
                            cfg_path)
    custom = "factory" in enc  # a custom network: its factory, not MLP layers
    hidden = _require(enc, "hidden_layers", _dim_list, "a list of positive integers",
                      "encoder", cfg_path, optional=custom)
    if custom:
        _check_network_block(enc, "encoder", n_features, cfg_path)
    _require(enc, "n_projection", lambda v: v == 0 or _dim(v), "a non-negative integer",
             "encoder", cfg_path, optional=True)
    _require(enc, "activation", lambda v: v in ACTIVATIONS, f"one of {ACTIVATIONS}",
             "encoder", cfg_path, optional=True)

    params = _require(doc, "params", is_dict, "an object", "the config", cfg_path)
    p_comp = _require(params, "n_components", _pos_int, "a positive integer", "params",
                      cfg_path)
    if p_comp != n_components:
        _invalid(cfg_path, f"params['n_components'] is {p_comp} but the encoder outputs "
                           f"{n_components} dimensions")
    p_hidden = _require(params, "hidden_layers", _pos_int_list, "a list of positive integers",
                        "params", cfg_path, optional=True)
    if p_hidden is not None and hidden is not None and p_hidden != hidden:
        _invalid(cfg_path, f"params['hidden_layers'] is {p_hidden} but the encoder has "
                           f"hidden layers {hidden}")
    for key in ("n_neighbors", "n_epochs", "batch_size"):
        _require(params, key, lambda v: v is None or _pos_int(v), "a positive integer",
                 "params", cfg_path, optional=True)
    for key in ("min_dist", "spread"):
        _require(params, key, _is_number, "a number", "params", cfg_path, optional=True)
    _require(params, "knn_method", lambda v: isinstance(v, str), "a string", "params",
             cfg_path, optional=True)
    _require(params, "precision", lambda v: isinstance(v, str), "a string", "params",
             cfg_path, optional=True)  # absent in models saved before it existed

    _require(params, "metric", lambda v: v in METRICS, f"one of {list(METRICS)}", "params",
             cfg_path, optional=True)

    dec = _require(doc, "decoder", is_dict, "an object", "the config", cfg_path,
                   optional=True)  # absent without parametric_reconstruction
    dec_sha = _require(doc, "decoder_sha256", _sha256_str, "a sha256 hex string",
                       "the config", cfg_path, optional=True)
    if (dec is None) != (dec_sha is None):
        _invalid(cfg_path, "'decoder' and 'decoder_sha256' must be both present or both "
                           "absent")
    if dec is not None:
        d_comp = _require(dec, "n_components", _dim, "a positive integer", "decoder",
                          cfg_path)
        if d_comp != n_components:
            _invalid(cfg_path, f"decoder['n_components'] is {d_comp} but the encoder outputs "
                               f"{n_components} dimensions")
        d_feat = _require(dec, "n_features", _dim, "a positive integer", "decoder", cfg_path)
        if d_feat != n_features:
            _invalid(cfg_path, f"decoder['n_features'] is {d_feat} but the encoder takes "
                               f"{n_features} features")
        _require(dec, "loss", lambda v: v in ("mse", "bce"), "'mse' or 'bce'", "decoder",
                 cfg_path)
        if "factory" in dec:
            _check_network_block(dec, "decoder", n_features, cfg_path)
        else:
            _require(dec, "hidden_layers", _dim_list, "a list of positive integers",
                     "decoder", cfg_path)
            _require(dec, "input_shape", _dim_list, "a list of positive integers", "decoder",
                     cfg_path)

    fitted = _require(doc, "fitted", is_dict, "an object", "the config", cfg_path)
    n_in = _require(fitted, "n_features_in", _pos_int, "a positive integer", "fitted",
                    cfg_path)
    if n_in != n_features:
        _invalid(cfg_path, f"fitted['n_features_in'] is {n_in} but the encoder takes "
                           f"{n_features} features")
    for key in ("a", "b"):
        _require(fitted, key, _is_number, "a number", "fitted", cfg_path)
    for key in ("n_samples_fit", "n_epochs"):
        _require(fitted, key, _pos_int, "a positive integer", "fitted", cfg_path)
    _require(fitted, "n_edges", _nonneg_int, "a non-negative integer", "fitted", cfg_path)
    _require(fitted, "knn_method", lambda v: isinstance(v, str), "a string", "fitted",
             cfg_path)
    _require(fitted, "loss_history", _number_list, "a list of numbers", "fitted", cfg_path)
    _require(fitted, "timings", lambda v: is_dict(v) and all(map(_is_number, v.values())),
             "an object of numbers", "fitted", cfg_path, optional=True)
    _require(fitted, "knn_recall", lambda v: v is None or _is_number(v), "a number or null",
             "fitted", cfg_path, optional=True)
    shape = _require(fitted, "input_shape", lambda v: v is None or (_dim_list(v) and bool(v)),
                     "a list of positive integers or null", "fitted", cfg_path, optional=True)
    if shape and int(np.prod(shape, dtype=np.int64)) != n_features:
        _invalid(cfg_path, f"fitted['input_shape'] {shape} does not hold {n_features} "
                           "features")
    for key in ("reconstruction_history", "validation_reconstruction"):
        _require(fitted, key, lambda v: v is None or _number_list(v), "a list of numbers",
                 "fitted", cfg_path, optional=True)
    _require(fitted, "input_identity",
             lambda v: v is None or (is_dict(v) and _pos_int(v.get("rows"))
                                     and _pos_int(v.get("features"))
                                     and _sha256_str(v.get("sha256"))),
             "null or an object of rows, features and a sha256", "fitted", cfg_path,
             optional=True)
    for key in ("peak_memory", "worker_peak_memory"):  # bytes per stage (optional)
        _require(fitted, key, lambda v: is_dict(v) and all(map(_is_number, v.values())),
                 "an object of numbers", "fitted", cfg_path, optional=True)
    stats = _require(fitted, "feature_stats", is_dict, "an object", "fitted", cfg_path)
    for key in FEATURE_STATS:
        values = _require(stats, key, _number_list, "a list of numbers",
                          "fitted['feature_stats']", cfg_path)
        if len(values) != n_features:
            _invalid(cfg_path, f"fitted['feature_stats'][{key!r}] has {len(values)} values "
                               f"but the model takes {n_features} features")
    lo, hi = np.asarray(stats["min"], float), np.asarray(stats["max"], float)
    if not (lo <= hi).all():
        _invalid(cfg_path, "fitted['feature_stats'] has min > max for feature "
                           f"{int(np.flatnonzero(~(lo <= hi))[0])}")
    return doc


# ---------------------------------------------------------------------- save
# files the CLI and the report write beside a saved model (the job's resolved config and the
# run report); a save that replaces the model replaces them too, as they describe the old one
COMPANION_FILES = ("run_config.json", "report.json", "report.html")
TRAINING_DATA = "training_data.npy"  # rows for transform(refine=True) (pumap_dask.refine)
MODEL_FILES = (CONFIG, WEIGHTS, EMBEDDING, DECODER, TRAINING_DATA, *COMPANION_FILES)


def check_model_path(path: str | os.PathLike) -> str:
    """Check that a model can be saved at ``path`` without destroying anything else.

    ``path`` may be absent, an empty directory, or a saved model (a directory holding only
    the model files), which a save replaces. Anything else is refused, so a mistyped path
    never deletes a user's directory.

    Parameters
    ----------
    path
        The intended model directory.

    Returns
    -------
    str
        The absolute path.

    Raises
    ------
    ModelFileError
        When ``path`` is a file or a directory that is not a saved pumap_dask model, or
        its parent directory is not writable.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path):
        if os.path.islink(path) or not os.path.isdir(path):
            raise ModelFileError(f"{path} exists and is not a saved pumap_dask model (not a "
                                 "directory); saving would replace it: choose another path "
                                 "or remove it first")
        extra = sorted(set(os.listdir(path)) - set(MODEL_FILES))
        if extra or (os.listdir(path) and not os.path.isfile(os.path.join(path, CONFIG))):
            what = f"it holds {extra[:3]}" if extra else f"it has no {CONFIG}"
            raise ModelFileError(f"{path} is not a saved pumap_dask model ({what}); saving "
                                 "would replace the directory and everything in it: choose "
                                 "another path or remove it first")

    try:
        writable_location(os.path.dirname(path) or ".", "the model's parent directory")
    except ValueError as exc:
        raise ModelFileError(f"cannot save a model at {path}: {exc}") from None
    return path


def save_model(path: str | os.PathLike, encoder: Encoder, config: dict[str, Any],
               embedding: np.ndarray | None = None, overwrite: bool = True,
               decoder: Any = None, training_data: np.ndarray | None = None) -> str:
    """Write a model directory atomically; returns its path.

    Parameters
    ----------
    path
        Target directory.
    encoder
        The trained encoder.
    config
        JSON-serialisable parameters and metadata: the ``"params"`` and ``"fitted"``
        blocks that :func:`validate_config` describes.
    embedding
        Training embedding to store beside the weights.
    overwrite
        Replace an existing model (or empty directory) at ``path``.
    decoder
        A trained :class:`pumap_dask.networks.Decoder`, stored as ``decoder.pt`` with its
        architecture and sha256 in the config (None: no decoder).
    training_data
        Training rows (float32, row-aligned with ``embedding``) stored as
        ``training_data.npy`` for ``transform(..., refine=True)`` (None: not stored).

    Raises
    ------
    ModelFileError
        When ``path`` holds something other than a saved model (see
        :func:`check_model_path`); it is left untouched.
    ValueError
        If the document would not pass :func:`validate_config` (nothing is written).
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    for what, net in (("encoder", encoder), ("decoder", decoder)):
        bad = None if net is None else nonfinite_tensor(net.state_dict())
        if bad is not None:
            raise TrainingError(f"refusing to save a model whose {what} has non-finite weights "
                                f"({bad!r}): the fit diverged; refit with a lower "
                                "learning_rate")
    check_model_path(path)
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-pumap-", dir=parent)
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        torch.save(state, os.path.join(tmp, WEIGHTS))
        doc = dict(config)
        doc["format_version"] = FORMAT_VERSION
        doc["encoder"] = encoder_spec(encoder)
        doc["weights_sha256"] = file_sha256(os.path.join(tmp, WEIGHTS))
        if decoder is not None:
            dstate = {k: v.detach().cpu().contiguous()
                      for k, v in decoder.state_dict().items()}
            torch.save(dstate, os.path.join(tmp, DECODER))
            doc["decoder"] = decoder.spec()
            doc["decoder_sha256"] = file_sha256(os.path.join(tmp, DECODER))
        if embedding is not None:
            np.save(os.path.join(tmp, EMBEDDING), np.asarray(embedding), allow_pickle=False)
            doc["embedding_sha256"] = file_sha256(os.path.join(tmp, EMBEDDING))
        if training_data is not None:
            np.save(os.path.join(tmp, TRAINING_DATA),
                    np.ascontiguousarray(training_data, dtype=np.float32), allow_pickle=False)
            doc["training_data_sha256"] = file_sha256(os.path.join(tmp, TRAINING_DATA))
        # hash what a reader will parse (tuples become lists, keys strings, ...)
        doc = json.loads(json.dumps(doc))
        doc.pop(CONFIG_HASH, None)
        try:
            validate_config(doc, path)
        except ModelFileError as exc:
            raise ModelFileError(f"refusing to save an unreadable model: {exc}") from None
        doc[CONFIG_HASH] = config_sha256(doc)
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
        apply_umask(tmp)  # mkdtemp makes 0700: the model follows the user's umask
        if os.path.exists(path):
            old = path + ".old-" + os.path.basename(tmp)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# ---------------------------------------------------------------------- load
def _check_version(doc: dict[str, Any], path: str, cfg_path: str) -> int:
    version = doc.get("format_version")
    if not _is_int(version):
        _invalid(cfg_path, f"'format_version' must be an integer, got {_short(version)}")
    readable = f"this version reads {READABLE_VERSIONS[0]}-{READABLE_VERSIONS[-1]}"
    if version > READABLE_VERSIONS[-1]:
        raise ModelFileError(f"{path!r} was written by a newer pumap_dask (format {version}); "
                             f"{readable}: upgrade pumap_dask to load it")
    if version < READABLE_VERSIONS[0]:
        raise ModelFileError(f"{path!r} was written by an older pumap_dask (format {version}); "
                             f"{readable}: re-fit the model")
    return version


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read, verify and validate a model directory's config.json.

    Parameters
    ----------
    path
        The model directory.

    Returns
    -------
    dict
        The config document, checked by :func:`validate_config`.

    Raises
    ------
    ModelFileError
        When the directory or config is missing or unreadable, the format version is not
        readable, the config's checksum does not match (the file was edited or damaged), or
        the document is malformed or inconsistent.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ModelFileError(f"no saved model at {path!r} (expected a directory written by "
                             "ParametricUMAP.save)")
    cfg_path = os.path.join(path, CONFIG)
    try:
        with open(cfg_path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ModelFileError(f"{path!r} has no {CONFIG}; it is not a saved model or the save "
                             "was interrupted") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{cfg_path} is corrupt ({exc}); {_FIX}") from None
    if not isinstance(doc, dict):
        validate_config(doc, path)  # raises: the top level must be an object
    version = _check_version(doc, path, cfg_path)
    if version >= 2:
        recorded = doc.get(CONFIG_HASH)
        if not _sha256_str(recorded):
            _invalid(cfg_path, f"format {version} needs {CONFIG_HASH!r} (a sha256 hex "
                               f"string), got {_short(recorded)}")
        if config_sha256(doc) != recorded:
            raise ModelFileError(f"{cfg_path} does not match the {CONFIG_HASH} recorded in "
                                 "it: the model was modified or corrupted after it was "
                                 f"saved; {_FIX}")
    else:
        key = os.path.abspath(path)
        if key not in _WARNED_V1:
            _WARNED_V1.add(key)
            logger.warning("the model at %s uses format version %d, whose %s has no "
                           "checksum, so edits to it cannot be detected; re-save it "
                           "(pumap_dask.load(path).save(path)) to upgrade it to format %d",
                           path, version, CONFIG, FORMAT_VERSION)
    return validate_config(doc, path)


def checked_file(path: str | os.PathLike, name: str, sha256: str, what: str,
                 verify: bool = True) -> str:
    """The path of the model file ``name``, present and matching the sha256 ``config.json``
    records for it.

    Parameters
    ----------
    path
        The model directory.
    name
        The file's name in it.
    sha256
        The recorded hash.
    what
        The file's contents, for the message (``"weights were"``, ``"embedding was"``).
    verify
        Check the hash (False: presence only).

    Raises
    ------
    ModelFileError
        When the file is missing (the directory is incomplete) or its hash differs (it was
        modified or corrupted).
    """
    fpath = os.path.join(os.fspath(path), name)
    if not os.path.exists(fpath):
        raise ModelFileError(f"{fpath} is missing although {CONFIG} records its sha256; the "
                             f"model directory is incomplete: {_FIX}")
    if verify and file_sha256(fpath) != sha256:
        raise ModelFileError(f"{fpath} does not match the sha256 recorded in {CONFIG}: the "
                             f"{what} modified or corrupted; {_FIX}")
    return fpath


def _read_state(fpath: str) -> Any:
    """A torch state dict from a model file (checked by :func:`checked_file` first)."""
    try:
        state = torch.load(fpath, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"cannot read {fpath} ({type(exc).__name__}: {exc}); the file is "
                             f"corrupt: {_FIX}") from exc
    bad = nonfinite_tensor(state) if isinstance(state, dict) else None
    if bad is not None:
        raise ModelFileError(f"{fpath} holds non-finite weights ({bad!r} has NaN or infinite "
                             "values): the fit that saved it diverged; refit with a lower "
                             "learning_rate")
    return state


def nonfinite_tensor(state: Mapping[str, Any]) -> str | None:
    """The name of the first floating tensor of ``state`` with a NaN or infinite value."""
    for name, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() \
                and not bool(torch.isfinite(value).all()):
            return name
    return None


def load_encoder(path: str | os.PathLike, verify: bool = True,
                 networks: Mapping[str, Any] | None = None) -> tuple[Encoder, dict[str, Any]]:
    """Rebuild the encoder of a saved model and check its weights against the stored hash.

    Parameters
    ----------
    path
        The model directory.
    verify
        Check ``weights.pt`` against the sha256 recorded in ``config.json``.
    networks
        Factories of custom networks, by the name the model records (see
        :func:`rebuild_network`); the built-in encoder needs none.

    Returns
    -------
    encoder, config

    Raises
    ------
    ModelFileError
        When the config is bad (see :func:`read_config`), or the weights are missing, do
        not match their checksum, cannot be read or do not fit the recorded architecture.
    """
    path = os.fspath(path)
    doc = read_config(path)
    wpath = checked_file(path, WEIGHTS, doc["weights_sha256"], "weights were", verify)
    state = _read_state(wpath)
    spec = doc["encoder"]
    if "factory" in spec:  # a custom network: its factory rebuilds it (no pickle)
        custom = rebuild_network(spec, "encoder", path, networks)
        expected = {k: tuple(v.shape) for k, v in custom.state_dict().items()}
    else:
        custom = None
        # models saved before the activation was recorded used LeakyReLU(0.1)
        args = (spec["n_features"], spec["n_components"], spec["hidden_layers"],
                spec.get("n_projection", 0), spec.get("activation", "leaky_relu"))
        # compare shapes on a storage-free skeleton first: a bad spec allocates nothing
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in Encoder(*args).state_dict().items()}
    problem = _state_mismatch(state, expected)
    if problem:
        raise ModelFileError(f"{wpath} does not fit the encoder described in {CONFIG} "
                             f"({problem}); the model directory is inconsistent (modified or "
                             f"corrupted): {_FIX}")
    enc = custom if custom is not None else Encoder(*args)
    try:
        enc.load_state_dict(state)
    except Exception as exc:
        raise ModelFileError(f"{wpath} does not fit the encoder described in {CONFIG} "
                             f"({type(exc).__name__}: {exc}); the model directory is "
                             f"inconsistent (modified or corrupted): {_FIX}") from exc
    return enc.eval(), doc


def rebuild_network(spec: dict[str, Any], what: str, path: str | os.PathLike,
                    networks: Mapping[str, Any] | None = None) -> Any:
    """An untrained custom encoder or decoder rebuilt from its config block, by a factory
    the caller passed in ``networks`` (name -> callable); nothing named in the file is
    imported.

    Raises
    ------
    ModelFileError
        When its factory is not in ``networks`` (the message says how to pass it), fails,
        or builds a network of another shape.
    """
    build = encoder_from_spec if what == "encoder" else decoder_from_spec
    name = spec.get("factory", "the default decoder")
    try:
        with torch.random.fork_rng(devices=[]):  # weights are loaded next: keep the RNG
            return build(spec, networks)
    except NetworkError as exc:
        raise ModelFileError(f"cannot load the model at {os.fspath(path)!r}: its {what} "
                             f"{exc}") from None
    except Exception as exc:
        raise ModelFileError(f"cannot load the model at {os.fspath(path)!r}: the factory "
                             f"{name!r} of its {what} failed when called with "
                             f"{spec.get('factory_arg')!r} ({type(exc).__name__}: {exc})"
                             ) from exc


def load_decoder(path: str | os.PathLike, doc: dict[str, Any], verify: bool = True,
                 networks: Mapping[str, Any] | None = None) -> Any:
    """The trained decoder of a saved model, or None when it has none.

    Parameters
    ----------
    path
        The model directory.
    doc
        Its config, from :func:`read_config`.
    verify
        Check ``decoder.pt`` against the sha256 recorded in ``config.json``.

    Raises
    ------
    ModelFileError
        When ``decoder.pt`` is missing, does not match its checksum, cannot be read, its
        factory is not in ``networks`` (see :func:`rebuild_network`), or it does not fit the
        recorded architecture.
    """
    if "decoder" not in doc:
        return None
    dpath = checked_file(path, DECODER, doc["decoder_sha256"], "decoder was", verify)
    state = _read_state(dpath)
    dec = rebuild_network(doc["decoder"], "decoder", path, networks)
    problem = _state_mismatch(state, {k: tuple(v.shape) for k, v in dec.state_dict().items()})
    if problem:
        raise ModelFileError(f"{dpath} does not fit the decoder described in {CONFIG} "
                             f"({problem}); the model directory is inconsistent: {_FIX}")
    dec.load_state_dict(state)
    return dec.eval()


def _state_mismatch(state: Any, expected: dict[str, tuple[int, ...]]) -> str | None:
    """How a loaded state dict differs from the expected tensor shapes (None: it fits)."""
    if not isinstance(state, dict):
        return f"expected a state dict of tensors, got a {type(state).__name__}"
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "the state dict holds values that are not tensors"
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} instead of {expected[k]}"
              for k in sorted(set(expected) & set(state))
              if tuple(state[k].shape) != expected[k]]
    parts = []
    if missing:
        parts.append(f"missing tensors {missing[:5]}")
    if unexpected:
        parts.append(f"unexpected tensors {unexpected[:5]}")
    if shapes:
        parts.append("shape mismatch " + "; ".join(shapes[:5]))
    return ", ".join(parts) or None


def load_embedding(path: str | os.PathLike, doc: dict[str, Any]) -> np.ndarray | None:
    """The stored training embedding, or None if the model was saved without it.

    Parameters
    ----------
    path
        The model directory.
    doc
        Its config, from :func:`read_config`.

    Raises
    ------
    ModelFileError
        When the embedding is missing, does not match its checksum, cannot be read, or is
        not of shape (n_samples_fit, n_components).
    """
    if "embedding_sha256" not in doc:
        return None
    epath = checked_file(path, EMBEDDING, doc["embedding_sha256"], "embedding was")
    try:
        emb = np.load(epath, allow_pickle=False)
    except Exception as exc:
        raise ModelFileError(f"cannot read {epath} ({type(exc).__name__}: {exc}); the file "
                             f"is corrupt: {_FIX}") from exc
    expected = (doc["fitted"]["n_samples_fit"], doc["encoder"]["n_components"])
    if emb.shape != expected or emb.dtype.kind != "f":
        raise ModelFileError(f"{epath} holds a {emb.dtype} array of shape {emb.shape}, but "
                             f"{CONFIG} describes a float embedding of shape {expected}; the "
                             f"model directory is inconsistent: {_FIX}")
    return emb


# --------------------------------------------------------------------------- estimators


