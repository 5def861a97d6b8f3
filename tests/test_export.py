"""ONNX export of the fitted encoder, checked with onnxruntime."""

import sys

import numpy as np
import pytest

from pumap_dask import ParametricUMAP

from .conftest import FAST

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ACTIVATIONS = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus", "Softmax",
               "HardSigmoid", "PRelu", "Gelu", "Clip"}


def _session(path):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def _producer(graph, name):
    return next(n for n in graph.node if name in n.output)


def test_onnx_matches_transform(fitted, blobs, tmp_path):
    path = fitted.export_onnx(tmp_path / "enc.onnx")
    X = blobs[1]  # held-out rows; a batch size other than the export's example (2)
    sess = _session(path)
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.name == "X" and out.name == "embedding"
    assert isinstance(inp.shape[0], str) and inp.shape[1] == fitted.n_features_in_  # dynamic
    for rows in (X, X[:1], np.concatenate([X, X, X])):
        Z = sess.run(None, {"X": rows.astype(np.float32)})[0]
        np.testing.assert_allclose(Z, fitted.transform(rows, refine=False), atol=1e-5, rtol=0)


def test_onnx_output_layer_is_linear(fitted, tmp_path):
    model = onnx.load(fitted.export_onnx(tmp_path / "enc.onnx"))
    onnx.checker.check_model(model)
    graph = model.graph
    last = _producer(graph, graph.output[0].name)
    assert last.op_type not in ACTIVATIONS, last.op_type
    assert last.op_type in ("Gemm", "Add", "MatMul"), last.op_type
    assert graph.node[-1].op_type not in ACTIVATIONS
    # the hidden layers keep their activation (SiLU: x * sigmoid(x); LeakyReLU), the
    # preprocessing is in the graph
    ops = [n.op_type for n in graph.node]
    act = {"silu": "Sigmoid", "leaky_relu": "LeakyRelu"}[fitted.activation]
    assert ops.count(act) == len(fitted.hidden_layers)
    assert ops[0] == "Sub"
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["n_components"] == "2" and meta["producer"] == "pumap_dask"


def test_onnx_with_pca_projection(digits, tmp_path):
    X = digits[0][:500]
    m = ParametricUMAP(n_projection=16, random_state=0, **FAST).fit(X)
    assert m.encoder_.n_projection == 16
    path = m.export_onnx(tmp_path / "sub" / "digits.onnx")
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert "MatMul" in ops[:3]  # the fixed PCA projection
    Z = _session(path).run(None, {"X": digits[0][500:537]})[0]
    np.testing.assert_allclose(Z, m.transform(digits[0][500:537], refine=False), atol=1e-5, rtol=0)


def test_export_needs_fit_and_onnx(monkeypatch, fitted, tmp_path):
    from pumap_dask import NotFittedError

    with pytest.raises(NotFittedError):
        ParametricUMAP().export_onnx(tmp_path / "x.onnx")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'pumap_dask\[onnx\]'"):
        fitted.export_onnx(tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_export_command(fitted, blobs, tmp_path, capsys):
    from pumap_dask.cli import EXIT_OK, EXIT_USAGE, main

    model_dir = fitted.save(str(tmp_path / "model"))
    out = tmp_path / "enc.onnx"
    assert main(["-q", "export", model_dir, str(out)]) == EXIT_OK
    Z = _session(str(out)).run(None, {"X": blobs[1]})[0]
    np.testing.assert_allclose(Z, fitted.transform(blobs[1], refine=False), atol=1e-5, rtol=0)
    assert main(["-q", "export", model_dir, str(out)]) == EXIT_USAGE
    assert "--overwrite" in capsys.readouterr().err
    assert main(["-q", "export", model_dir, str(out), "--overwrite"]) == EXIT_OK
