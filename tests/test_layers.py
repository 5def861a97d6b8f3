"""The package's layers import only downward, with no cycle and no hidden (function-local)
import of package code; a function-local import is only for an optional third-party package."""

import ast
import pathlib
import subprocess
import sys

import pytest

import pumap_dask

PACKAGE = pathlib.Path(pumap_dask.__file__).parent

# bottom to top; a module may import its own layer (without a cycle) and any layer below
LAYERS = [
    {"_version", "errors"},
    {"arrays", "io"},
    {"params", "nndescent"},
    {"knn", "graph", "init", "datasets", "progress", "inputs", "batches", "losses"},
    {"encoder", "networks"},
    {"model", "landmarks"},
    {"collectives", "checkpoint", "callbacks", "reconstruction", "replicas", "train", "transform",
     "refine"},
    {"distributed", "distributed.edges", "distributed.cluster", "distributed.knn_dask",
     "distributed.graph_dask", "distributed.rowcache", "distributed.ddp"},
    {"continued", "writers", "workdir", "state"},
    {"pipeline"},
    {"estimator", "embed", "config", "export", "plotting", "report_format", "report_metrics",
     "report_html", "report", "cli", ""},
]
OPTIONAL = {"cupy", "yaml", "tomllib", "tomli", "dask_jobqueue", "dask_mpi", "anndata", "onnx",
            "onnxruntime", "onnxscript", "matplotlib", "tqdm",
            # the hnsw extra (knn_method="hnsw"): usearch, wheels on every platform
            "usearch",
            # required, but compiles numba kernels on import (1.5 s of every CLI start)
            "pynndescent",
            # required (the host kernels, arrays.host_kernel): 0.6 s to import
            "numba",
            # required, but 2-3 s to import: errors.NotFittedError subclasses scikit-learn's
            # on first use, so transform workers never import it
            "sklearn"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: pathlib.Path, modules: dict) -> list[tuple[str, bool, int]]:
    """(imported module, function-local?, line) for each import of package code."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    pkg = [p for p in pkg if p]
    found = []
    for node in ast.walk(tree):
        local = id(node) not in top
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg[:len(pkg) - (node.level - 1)] + (node.module.split(".") if node.module
                                                          else [])
            target = ".".join(base)
            subs = [f"{target}.{a.name}".lstrip(".") for a in node.names
                    if f"{target}.{a.name}".lstrip(".") in modules]
            found += [(s, local, node.lineno) for s in subs]
            if len(subs) < len(node.names):
                found.append((target, local, node.lineno))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module])
            for m in mods:
                if m == "pumap_dask" or m.startswith("pumap_dask."):
                    found.append((m[len("pumap_dask."):] if "." in m else "", local,
                                  node.lineno))
    return found


def _layer(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"module pumap_dask.{name} has no layer in tests/test_layers.py: "
                         "place it in LAYERS")


def test_every_import_goes_down_and_none_hides_in_a_function():
    modules = _modules()
    faults = []
    for name, path in sorted(modules.items()):
        for target, local, line in _imports(name, path, modules):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if local:
                faults.append(f"{where}: function-local import of pumap_dask.{target}")
            if _layer(target) > _layer(name):
                faults.append(f"{where}: pumap_dask.{name} imports pumap_dask.{target}, "
                              "a layer above it")
    assert not faults, "\n".join(faults)


def test_no_import_cycle():
    modules = _modules()
    graph = {n: {t for t, _, _ in _imports(n, p, modules) if t != n}
             for n, p in modules.items()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):]
                                                                     + [n, m]))
            if m not in state:
                visit(m, stack + [n])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])


def test_function_local_imports_are_optional_packages_only():
    faults = []
    for name, path in sorted(_modules().items()):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if id(node) in top or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.ImportFrom) and node.level:
                continue  # package code: reported by the layer test
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module])
            for m in mods:
                if m.split(".")[0] not in OPTIONAL:
                    faults.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: "
                                  f"function-local import of {m} (a required dependency: "
                                  "import it at the top)")
    assert not faults, "\n".join(faults)


def test_the_layer_test_sees_a_fault(tmp_path):
    """The walker is not blind: an upward and a hidden import are both reported."""
    src = tmp_path / "m.py"
    src.write_text("from .pipeline import fit\n\ndef f():\n    from . import cli\n")
    found = _imports("knn", src, {"pipeline": None, "cli": None, "knn": None})
    assert ("pipeline", False, 1) in found and ("cli", True, 4) in found


def test_the_transform_path_does_not_import_scikit_learn():
    """A worker that unpickles a transform task imports ``pumap_dask.transform`` (through
    the package root): scikit-learn (2-3 s) stays out; the public names still resolve."""
    code = ("import sys, pumap_dask, pumap_dask.transform\n"
            "assert 'sklearn' not in sys.modules, 'sklearn imported'\n"
            "assert callable(pumap_dask.transform) and callable(pumap_dask.ood_mask)\n"
            "from pumap_dask import ParametricUMAP, NotFittedError\n"
            "import sklearn.exceptions\n"
            "assert issubclass(NotFittedError, sklearn.exceptions.NotFittedError)\n"
            "assert pumap_dask.transform.__module__ == 'pumap_dask.transform'\n"
            "assert pumap_dask.datasets.trajectory_like\n"
            "assert set(pumap_dask.__all__) <= set(dir(pumap_dask))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_an_unknown_name_of_the_package_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nonesuch'"):
        pumap_dask.nonesuch  # noqa: B018
