"""Export a fitted encoder to ONNX, for inference without Python, torch or pumap_dask.

The exported graph is the whole frozen encoder: the fixed preprocessing its ``forward``
applies (centring, the optional PCA projection, the global scale) followed by the MLP. The
output layer is linear, as in training (umap-learn's ParametricUMAP export adds a ReLU
there, which clips the embedding). The batch dimension is dynamic; the input is float32 of
shape ``(batch, n_features)`` named ``"X"``, the output ``(batch, n_components)`` named
``"embedding"``.

Needs the optional ``onnx`` extra (``pip install 'pumap_dask[onnx]'``: onnx, onnxruntime and
onnxscript, which torch's exporter uses). Check an export with onnxruntime::

    import onnxruntime as ort
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    Z = sess.run(None, {"X": X.astype("float32")})[0]    # equals model.transform(X)
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import logging
import os
import warnings
from typing import Any

import torch

from .errors import InputError

logger = logging.getLogger(__name__)

INPUT_NAME = "X"
OUTPUT_NAME = "embedding"
_INSTALL = "pip install 'pumap_dask[onnx]' (or: pip install onnx onnxruntime onnxscript)"


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise ImportError(f"export_onnx needs the onnx package, which is not installed: "
                          f"{_INSTALL}") from exc
    return onnx


def is_pumap_onnx(path: str | os.PathLike) -> bool:
    """True when ``path`` is an ONNX file :func:`export_encoder` wrote (its metadata names
    pumap_dask as the producer); False for anything else, or without ``onnx``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    try:
        import onnx
    except ImportError:
        return False
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # not ONNX: onnx raises several types (DecodeError, OSError, ...)
        return False
    return any(p.key == "producer" and p.value == "pumap_dask" for p in model.metadata_props)


def check_export_path(path: str | os.PathLike, *, overwrite: bool = True) -> str:
    """Refuse an export path where writing would replace something pumap_dask did not write.

    Parameters
    ----------
    path
        The ``.onnx`` file to write.
    overwrite
        Whether an earlier pumap_dask export there may be replaced (never anything else).

    Returns
    -------
    str
        The absolute path.

    Raises
    ------
    InputError
        For a directory, an existing file without ``overwrite``, or a file pumap_dask did
        not export (the message names ``--overwrite`` or asks for another path).
    ImportError
        When a file is there and ``onnx`` is not installed to read it.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise InputError(f"the export path {path} is a directory; pass the path of the .onnx "
                         f"file to write, e.g. {os.path.join(path, 'encoder.onnx')}")
    if os.path.lexists(path):
        if not overwrite:
            raise InputError(f"{path} exists; pass --overwrite to replace an earlier export, "
                             "or choose another path")
        _require_onnx()  # to tell an earlier export from anything else
        if not is_pumap_onnx(path):
            raise InputError(f"{path} exists and is not an ONNX model pumap_dask exported; it "
                             "is never overwritten (not even with --overwrite): choose another "
                             "path or move the file away")
    return path


def export_encoder(encoder: torch.nn.Module, path: str | os.PathLike, *,
                   opset_version: int | None = None,
                   metadata: dict[str, Any] | None = None) -> str:
    """Write ``encoder`` (an :class:`~pumap_dask.model.Encoder`) as an ONNX model.

    Parameters
    ----------
    encoder
        The frozen encoder; it is copied to the CPU in eval mode, the original is untouched.
    path
        The ``.onnx`` file to write (its directory is created; an earlier export there is
        replaced, anything else is refused: :func:`check_export_path`).
    opset_version
        ONNX opset of the export (None: torch's default, 18 or above with current torch).
    metadata
        Extra string key/value pairs stored in the model's ``metadata_props``.

    Returns
    -------
    str
        The absolute path written.

    Raises
    ------
    ImportError
        When ``onnx`` is not installed (the message says how to install it).
    InputError
        When ``path`` is a directory or a file pumap_dask did not export.
    """
    onnx = _require_onnx()
    path = check_export_path(path)  # an earlier export is replaced, nothing else
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    enc = copy.deepcopy(encoder).cpu().float().eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    n_features = int(enc.n_features)
    example = torch.zeros(2, n_features)
    tmp = f"{path}.tmp-{os.getpid()}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        new_exporter = "dynamo" in inspect.signature(torch.onnx.export).parameters
        if new_exporter and importlib.util.find_spec("onnxscript") is not None:
            # the torch.export-based exporter (torch's default since 2.9)
            _quiet_exporter_logs()
            torch.onnx.export(enc, (example,), tmp, dynamo=True, opset_version=opset_version,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes=({0: torch.export.Dim("batch")},),
                              external_data=False, verbose=False)
        else:
            logger.info("onnxscript is not installed: using torch's TorchScript-based ONNX "
                        "exporter (deprecated by torch; %s)", _INSTALL)
            legacy = {"dynamo": False} if new_exporter else {}
            torch.onnx.export(enc, (example,), tmp, opset_version=opset_version,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              **legacy)
    try:
        model = onnx.load(tmp)
        meta = {"producer": "pumap_dask", "n_features": n_features,
                "n_components": int(enc.n_components), **(metadata or {})}
        for key, value in meta.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = str(key), str(value)
        onnx.checker.check_model(model)
        onnx.save(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("encoder exported to ONNX: %s (%d -> %d, opset %s)", path, n_features,
                int(enc.n_components), [o.version for o in model.opset_import])
    return path


def _quiet_exporter_logs() -> None:
    """torch's exporter warns at import about optional torchvision ops; not our concern."""
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
