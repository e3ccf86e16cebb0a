"""The sweep summary (dermascan.sweep): per recipe, mean ± sd over folds and seeds; MLflow parent runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from dermascan.errors import DataError
from dermascan.sweep import SUMMARY_JSON, SUMMARY_MD, summarise, write_summary

from .conftest import REPO


def fake_job(sweep: Path, num: int, overrides: list[str], fold: int, seed: int, val: float, test: float,
             uri: str, run_id: str | None = None, finished: bool = True) -> Path:
    """A job folder as python -m dermascan.train -m leaves it (the files the summary reads)."""
    run_dir = sweep / str(num)
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    cfg = {"seed": seed, "data": {"split": "kfold", "fold": fold, "folds": 3}, "evaluate": {"split": "test"},
           "tracking": {"enabled": True, "uri": uri, "experiment": "dermascan"}}
    OmegaConf.save(OmegaConf.create(cfg), run_dir / "config.yaml")
    if finished:
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "best.keras").write_bytes(b"x")
        summary = {"val": {"balanced_accuracy": val, "mean_auc": 0.9, "top1_accuracy": 0.8},
                   "test": {"balanced_accuracy": test, "mean_auc": 0.8, "top1_accuracy": 0.7}}
        (run_dir / "summary.json").write_text(json.dumps(summary))
    if run_id:
        (run_dir / "mlflow_run_id.txt").write_text(run_id)
    return run_dir


def test_summary_groups_by_recipe_with_mean_and_sample_sd_and_nests_the_runs_in_mlflow(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("dermascan", artifact_location=(tmp_path / "art").as_uri())
    runs = [client.create_run(experiment).info.run_id for _ in range(4)]
    sweep = tmp_path / "multirun" / "2026-12-01_12-00-00"
    lr = "train.phase2.lr=1e-4"
    fake_job(sweep, 0, [lr, "data.fold=0", "paths.runs_dir=/x"], 0, 42, 0.60, 0.50, uri, runs[0])
    fake_job(sweep, 1, [lr, "data.fold=1", "paths.runs_dir=/x"], 1, 42, 0.70, 0.60, uri, runs[1])
    fake_job(sweep, 2, [lr, "data.fold=2", "paths.runs_dir=/x"], 2, 42, 0.80, 0.55, uri, runs[2])
    fake_job(sweep, 3, ["train.phase2.lr=3e-5", "data.fold=0"], 0, 42, 0.40, 0.45, uri, runs[3])
    fake_job(sweep, 4, ["train.phase2.lr=3e-5", "data.fold=1"], 1, 42, 0, 0, uri, finished=False)

    summary = write_summary(sweep)
    first, second = sorted(summary["groups"], key=lambda g: g["recipe"] != lr)
    assert first["recipe"] == lr and [r["fold"] for r in first["runs"]] == [0, 1, 2]
    val = first["stats"]["val_balanced_accuracy"]
    assert val["mean"] == pytest.approx(0.70) and val["sd"] == pytest.approx(0.10) and val["n"] == 3
    assert first["stats"]["test_balanced_accuracy"]["sd"] == pytest.approx(0.05)
    assert second["stats"]["val_balanced_accuracy"] == {"mean": pytest.approx(0.40), "sd": None, "n": 1}
    assert summary["unfinished"] == [str((sweep / "4").resolve())]
    written = json.loads((sweep / SUMMARY_JSON).read_text())
    assert {g["recipe"]: g["mlflow_parent_run_id"] for g in written["groups"]}[lr] == first["mlflow_parent_run_id"]
    report = (sweep / SUMMARY_MD).read_text()
    assert "| **mean ± sd (3 runs)** | | | 0.700 ± 0.100 |" in report and "Unfinished jobs" in report

    parent = client.get_run(first["mlflow_parent_run_id"])
    assert parent.data.metrics["val_balanced_accuracy_mean"] == pytest.approx(0.70)
    assert parent.data.metrics["test_balanced_accuracy_sd"] == pytest.approx(0.05)
    assert parent.data.tags["stage"] == "sweep" and parent.info.status == "FINISHED"
    children = {r.info.run_id for r in client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{first['mlflow_parent_run_id']}'")}
    assert children == set(runs[:3])
    # Summarising again (after a resumed job finished) updates the same parent runs.
    fake_job(sweep, 5, ["train.phase2.lr=3e-5", "data.fold=2"], 2, 42, 0.50, 0.50, uri)
    again = write_summary(sweep)
    assert {g["mlflow_parent_run_id"] for g in again["groups"]} == {g["mlflow_parent_run_id"] for g in summary["groups"]}
    assert len(client.search_runs([experiment], "tags.stage = 'sweep'")) == 2


def test_a_sweep_without_finished_jobs_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        summarise(tmp_path / "nowhere")
    with pytest.raises(DataError, match="holds no training run dirs"):
        summarise(tmp_path)
    fake_job(tmp_path, 0, ["data.fold=0"], 0, 1, 0, 0, "sqlite:///x.db", finished=False)
    with pytest.raises(DataError, match="no job of the sweep .* has finished"):
        summarise(tmp_path)


@pytest.mark.integration
def test_sweep_cli_writes_the_summary(tmp_path):
    sweep = tmp_path / "sweep"
    fake_job(sweep, 0, ["seed=1"], 0, 1, 0.5, 0.4, "sqlite:///x.db")
    fake_job(sweep, 1, ["seed=2"], 0, 2, 0.7, 0.6, "sqlite:///x.db")
    result = subprocess.run(
        [sys.executable, "-m", "dermascan.sweep", f"sweep_dir={sweep}", "log_to_mlflow=false"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "0.600 ± 0.141" in (sweep / SUMMARY_MD).read_text()
    missing = subprocess.run([sys.executable, "-m", "dermascan.sweep", f"sweep_dir={tmp_path / 'none'}"],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
    assert missing.returncode == 2 and "not a directory" in missing.stdout + missing.stderr


@pytest.mark.slow  # two real fold jobs, one killed and resumed (~3 min)
def test_a_killed_fold_job_resumes_in_the_same_run_dir_and_mlflow_run(tmp_path):
    import os
    import signal
    import time

    sweep = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "dermascan.train", "-m", "debug=default", "data.split=kfold", "data.folds=3",
        "data.fold=0,1", "train.phase1.epochs=2", "train.phase2.epochs=2", "export.enabled=false",
        f"paths.data_dir={tmp_path / 'data'}", f"paths.runs_dir={tmp_path / 'runs'}", f"hydra.sweep.dir={sweep}",
    ]
    first = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    history = sweep / "1" / "history.csv"
    deadline = time.time() + 600
    while not (history.is_file() and len(history.read_text().splitlines()) >= 2):  # job 1 logged an epoch
        assert first.poll() is None and time.time() < deadline, "job 1 never logged an epoch"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    run_id = (sweep / "1" / "mlflow_run_id.txt").read_text().strip()
    finished_before = (sweep / "0" / "summary.json").stat().st_mtime_ns
    assert not (sweep / "1" / "summary.json").exists()

    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished" in again.stderr + again.stdout  # job 0 is not redone
    assert (sweep / "0" / "summary.json").stat().st_mtime_ns == finished_before
    assert (sweep / "1" / "mlflow_run_id.txt").read_text().strip() == run_id
    epochs = [int(line.split(",")[0]) for line in history.read_text().splitlines()[1:]]
    assert sorted(set(epochs)) == [0, 1, 2, 3]
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "final_test_balanced_accuracy" in run.data.metrics
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss"))[-1] == 3
    summary = json.loads((sweep / SUMMARY_JSON).read_text())
    (group,) = summary["groups"]
    assert [r["fold"] for r in group["runs"]] == [0, 1] and summary["unfinished"] == []
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{group['mlflow_parent_run_id']}'")
    assert {r.info.run_id for r in children} == {run_id, (sweep / "0" / "mlflow_run_id.txt").read_text().strip()}
