import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr

import pumap_dask
from pumap_dask.cli import main


def test_fit_and_transform_commands(blobs, tmp_path):
    Xtr, Xte = blobs[0], blobs[1]
    for name, X in (("train", Xtr), ("test", Xte)):
        z = zarr.create_array(str(tmp_path / f"{name}.zarr"), shape=X.shape, chunks=(64, 16),
                              dtype="float32")
        z[:] = X
    params = json.dumps({"n_epochs": 5, "hidden_layers": [16], "batch_size": 2048})
    main(["-q", "fit", str(tmp_path / "train.zarr"), str(tmp_path / "model"),
          "--scheduler", "threads", "--device", "cpu", "--params", params])
    model = pumap_dask.load(tmp_path / "model")
    assert model.n_epochs_ == 5
    main(["-q", "transform", str(tmp_path / "test.zarr"), str(tmp_path / "model"),
          "--out", str(tmp_path / "emb.zarr"), "--scheduler", "threads"])
    emb = zarr.open_array(str(tmp_path / "emb.zarr"), mode="r")[:]
    assert np.abs(emb - model.transform(Xte, refine=False)).max() <= 1e-5


def test_demo_command(tmp_path, capsys):
    main(["-q", "demo", "--out", str(tmp_path), "--n-samples", "400", "--scheduler", "threads"])
    out = capsys.readouterr().out
    assert "Parametric UMAP Model" in out
    acc = float(out.split("held-out 15-NN accuracy:")[1].split()[0])
    assert acc > 0.9
    for name in ("pumap_train.png", "pumap_test.png", "pumap_overlay.png", "model"):
        assert os.path.exists(tmp_path / name)


@pytest.mark.slow
def test_vignette_example(tmp_path):
    """The seed vignette end to end (batch 128, 100 epochs): summary, accuracy, pictures."""
    import runpy

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mod = runpy.run_path(os.path.join(root, "examples", "vignette.py"))
    mod["main"](str(tmp_path))
    for name in ("vignette_train.png", "vignette_test.png", "vignette_overlay.png"):
        assert os.path.getsize(tmp_path / name) > 10_000


def test_pipeline_job_script(blobs, tmp_path):
    """pipelines/embed_job.sh: fit once, embed query stores in place, rerun reuses the model."""
    import subprocess
    import warnings

    anndata = pytest.importorskip("anndata")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    stores = []
    for name, X in (("ref", blobs[0]), ("query", blobs[1])):
        adata = anndata.AnnData(X=np.zeros((len(X), 2), np.float32))
        adata.obsm["X_pca"] = X
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            adata.write_zarr(tmp_path / f"{name}.zarr")
        stores.append(str(tmp_path / f"{name}.zarr"))
    env = {**os.environ, "PUMAP_SCHEDULER": "threads",
           "PUMAP_PARAMS": json.dumps({"n_epochs": 3, "hidden_layers": [16], "device": "cpu"})}
    cmd = ["bash", os.path.join(root, "pipelines", "embed_job.sh"), stores[0],
           str(tmp_path / "model"), stores[1]]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    model = pumap_dask.load(tmp_path / "model")
    emb = anndata.read_zarr(stores[1]).obsm["X_pumap"]
    assert np.abs(emb - model.transform(blobs[1], refine=False)).max() <= 1e-5
    out = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True).stdout
    assert "reusing model" in out


WORKER_IMPORTS = """
import sys
import sklearn.neighbors  # a heavy import of this main module, as the command line has
from pumap_dask.config import cluster_settings
from pumap_dask.distributed.cluster import close, connect

if __name__ == "__main__":
    client = connect(cluster_settings({}, {"workers": 1, "threads": 1, "memory": "1GiB"}))
    try:
        print(list(client.run(lambda: "sklearn" in sys.modules).values()))
    finally:
        close(client)
"""


@pytest.mark.parametrize("name,imports", [("pumap-dask", False), ("job.py", True)])
def test_local_workers_do_not_import_the_command_line(tmp_path, name, imports):
    # spawned workers import the parent's main module; the command line's (the
    # `pumap-dask` script, `python -m pumap_dask.cli`) is hidden from them, a user's is not
    script = tmp_path / name
    script.write_text(WORKER_IMPORTS)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == f"[{imports}]"
