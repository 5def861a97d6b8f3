"""``pumap-dask fit --init-model MODEL_DIR --landmarks PATH --landmark-loss-weight W`` and the
same keys in the job file's [fit] table."""

import json

import numpy as np

from pumap_dask import load
from pumap_dask.cli import EXIT_OK, EXIT_USAGE, main

from .test_cli_errors import _run, no_cluster  # noqa: F401  (fixtures)

FIT = {"n_epochs": 4, "batch_size": 1024, "hidden_layers": [16], "device": "cpu"}


def test_fit_init_model_with_landmarks_end_to_end(store, tmp_path, blobs):
    old_dir = str(tmp_path / "old")
    assert main(["-q", "fit", store, old_dir, "--scheduler", "threads", "--params",
                 json.dumps(FIT)]) == EXIT_OK
    old = load(old_dir)
    n = len(blobs[0])
    pos = np.full((n, 2), np.nan, np.float32)
    pos[:60] = old.embedding_[:60] + 2.0  # away from where the old model puts them
    np.save(tmp_path / "lm.npy", pos)
    new_dir = str(tmp_path / "new")
    # no --params: the architecture comes from the init model's saved parameters
    assert main(["-q", "fit", store, new_dir, "--scheduler", "threads", "--init-model",
                 old_dir, "--landmarks", str(tmp_path / "lm.npy"),
                 "--landmark-loss-weight", "10"]) == EXIT_OK
    new = load(new_dir)
    assert new.hidden_layers == (16,) and new.n_epochs == 4
    assert new.landmark_loss_weight == 10.0
    d_old = np.linalg.norm(old.embedding_[:60] - pos[:60], axis=1)
    d_new = np.linalg.norm(new.embedding_[:60] - pos[:60], axis=1)
    assert np.median(d_new) < 0.5 * np.median(d_old)
    resolved = json.loads((tmp_path / "new" / "run_config.json").read_text())["resolved"]
    assert resolved["init_model"] == old_dir
    assert resolved["landmarks"] == str(tmp_path / "lm.npy")


def test_job_file_keys_and_precedence(store, fitted, tmp_path, capsys):
    old_dir = fitted.save(tmp_path / "old")
    np.save(tmp_path / "lm.npy", np.full((len(fitted.embedding_), 2), np.nan))
    job = tmp_path / "job.toml"
    job.write_text(f"""
[fit]
input = "{store}"
model = "{tmp_path / 'm'}"
init_model = "{old_dir}"
landmarks = "{tmp_path / 'lm.npy'}"
landmark_loss_weight = 0.5
""")
    assert main(["fit", "--config", str(job), "--dry-run"]) == EXIT_OK
    out = capsys.readouterr().out
    resolved = json.loads(out[:out.rindex("}") + 1])
    assert resolved["init_model"] == old_dir
    assert resolved["landmarks"] == str(tmp_path / "lm.npy")
    assert resolved["params"]["landmark_loss_weight"] == 0.5      # file > default
    assert resolved["params"]["hidden_layers"] == [32, 32]        # init model's, as default
    assert main(["fit", "--config", str(job), "--dry-run", "--landmark-loss-weight", "2",
                 "--params", '{"hidden_layers": [32, 32], "landmark_loss_weight": 1.5}']) == 0
    out = capsys.readouterr().out
    assert json.loads(out[:out.rindex("}") + 1])["params"]["landmark_loss_weight"] == 2.0
    assert main(["fit", "--config", str(job), "--dry-run", "--params",
                 '{"landmark_loss_weight": 1.5}']) == 0  # --params > file
    out = capsys.readouterr().out
    assert json.loads(out[:out.rindex("}") + 1])["params"]["landmark_loss_weight"] == 1.5


def test_bad_init_model_and_landmarks(store, fitted, tmp_path, capsys, no_cluster):
    old_dir = fitted.save(tmp_path / "old")
    out = str(tmp_path / "m")
    n = len(fitted.embedding_)
    np.save(tmp_path / "short.npy", np.zeros((n - 1, 2)))
    np.save(tmp_path / "partial.npy", np.array([[1.0, np.nan]] * n))
    (tmp_path / "text.npy").write_text("not an array")
    (tmp_path / "plain").mkdir()
    cases = [
        (["--init-model", str(tmp_path / "nowhere")], "--init-model"),
        (["--init-model", str(tmp_path / "plain")], "--init-model"),
        (["--init-model", old_dir, "--n-components", "3"], "n_components: init_model 2 vs 3"),
        (["--landmarks", str(tmp_path / "none.npy")], "no such file"),
        (["--landmarks", str(tmp_path / "short.npy")], f"shape ({n}, 2)"),
        (["--landmarks", str(tmp_path / "partial.npy")], "NaN in some coordinates"),
        (["--landmarks", str(tmp_path / "text.npy")], "not a readable .npy"),
        (["--landmark-loss-weight", "-1"], "(flag --landmark-loss-weight)"),
    ]
    for extra, needle in cases:
        code, lines, err = _run(["fit", store, out] + extra, capsys)
        assert code == EXIT_USAGE, (extra, err)
        assert len(lines) == 1 and needle in lines[0], (extra, err)
        assert "Traceback" not in err
    assert not (tmp_path / "m").exists()
    job = tmp_path / "job.toml"
    job.write_text(f'[fit]\ninput = "{store}"\nmodel = "{out}"\ninit_model = 3\n')
    code, lines, _ = _run(["fit", "--config", str(job)], capsys)
    assert code == EXIT_USAGE and "init_model must be a non-empty string" in lines[0]
