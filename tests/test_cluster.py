"""Many runs at once (issue 16): the launcher and sweeper configs in configs/hydra/, and one shared MLflow server.

The configs build on Hydra's plugins (hydra-submitit-launcher, hydra-joblib-launcher,
hydra-optuna-sweeper); a test whose plugin is not installed is skipped, naming it.
The two tests that train (two real debug jobs each) are slow-marked: about a minute each on 2 idle
CPU cores (the server's start and stop included), two when other work shares the cores; the rest
take about 10 s in all.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from dermascan.config import RunConfig, config_dir

from .conftest import compose_config

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "TF_CPP_MIN_LOG_LEVEL": "2"}
# plugin -> (its module, the package that installs it)
PLUGINS = {
    "submitit": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "optuna": ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper"),
}


def needs(plugin: str) -> pytest.MarkDecorator:
    """Skip, naming the package, where the Hydra plugin is not installed."""
    module, package = PLUGINS[plugin]
    try:
        missing = importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # no hydra_plugins namespace at all
        missing = True
    return pytest.mark.skipif(missing, reason=f"{module} is not importable: pip install {package} (pyproject.toml)")


def hydra_config(*overrides: str) -> DictConfig:
    """configs/train.yaml composed with its ``hydra`` node, as ``python -m dermascan.train ... --cfg hydra`` shows it."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def train_cli(tmp_path: Path, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    """``python -m dermascan.train -m debug=default ...`` with data and runs under tmp_path, no export."""
    return subprocess.run(
        [sys.executable, "-m", "dermascan.train", "-m", "debug=default", f"paths.data_dir={tmp_path / 'data'}",
         f"paths.runs_dir={tmp_path / 'runs'}", "export.enabled=false", *overrides],
        capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=timeout, check=False,
    )


def job_logs(sweep: Path) -> str:
    """The tail of every submitit job log of the sweep (for a failure message)."""
    return "\n".join(f"--- {log}\n{log.read_text()[-2000:]}" for log in sorted(sweep.glob(".submitit/*/*.out")))


# --- The configs, composed (no training) -------------------------------------------------------------------------


@needs("submitit")
@needs("joblib")
@pytest.mark.parametrize(
    ("name", "target", "threads"),
    [("local", "submitit_launcher.LocalLauncher", "1"), ("slurm", "submitit_launcher.SlurmLauncher", "8"),
     ("pool", "joblib_launcher.JoblibLauncher", "1")],
)
def test_launcher_configs_build_on_the_plugins_and_size_tensorflow_threads(name, target, threads):
    cfg = hydra_config(f"hydra/launcher={name}")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith(target)
    # TensorFlow's thread pools per job, set in the job's environment by Hydra before the job starts TensorFlow.
    env = cfg.hydra.job.env_set
    assert env.TF_NUM_INTRAOP_THREADS == threads and env.TF_NUM_INTEROP_THREADS == threads
    if name == "local":
        assert launcher.gpus_per_node == 0 and launcher.timeout_min == 720
        assert hydra_config("hydra/launcher=local", "hydra.launcher.cpus_per_task=4").hydra.job.env_set.TF_NUM_INTRAOP_THREADS == "4"
    # The plugins' own configs keep their names (ours do not shadow them).
    own = {"local": "submitit_local", "slurm": "submitit_slurm", "pool": "joblib"}[name]
    assert hydra_config(f"hydra/launcher={own}").hydra.launcher._target_.endswith(target)


@needs("submitit")
def test_slurm_launcher_submits_one_array_with_the_configured_resources(tmp_path, monkeypatch):
    """The real plugin's launch, up to sbatch: the batch script carries partition, time, GPUs, CPUs, memory and setup."""
    import submitit
    from hydra.core.utils import JobReturn
    from hydra.utils import instantiate
    from submitit.slurm.slurm import SlurmExecutor

    cfg = hydra_config(
        "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.launcher.partition=gpu",
        "hydra.launcher.setup=['source .venv/bin/activate']", "hydra.job.name=train",
    )
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun here
    submitted = {}

    def map_array(executor, fn, *iterables):
        submitted.update(executor=executor, jobs=list(zip(*iterables)))
        ret = JobReturn()
        ret.return_value = None
        return [type("Job", (), {"results": lambda self: [ret]})() for _ in submitted["jobs"]]

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    launcher.launch([["data.fold=0"], ["data.fold=1"]], initial_job_idx=0)
    assert [job[0] for job in submitted["jobs"]] == [["data.fold=0"], ["data.fold=1"]]
    slurm = submitted["executor"]._executor
    assert isinstance(slurm, SlurmExecutor) and slurm.parameters["array_parallelism"] == 16
    script = slurm._make_submission_file_text("python -u -m submitit.core._submit DIR", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=240", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                 "source .venv/bin/activate"):
        assert line in script, (line, script)
    assert str(slurm.folder).startswith(str(tmp_path / "sweep" / ".submitit"))


@needs("optuna")
def test_search_space_names_real_knobs_with_valid_values():
    """Every searched key is a config key, its range passes the config checks, and each unfreeze_from is a layer."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import (
        CategoricalDistribution,
        LogUniformDistribution,
        UniformDistribution,
    )

    from dermascan.modeling.model import build_model, unfreeze

    sweeper = hydra_config("hydra/sweeper=optuna_search").hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.storage is None and sweeper.sampler.seed == 42
    space, fixed = create_params_from_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    assert not fixed
    assert set(space) == {"train.phase1.lr", "train.phase2.lr", "model.head.dropout.0", "model.head.dropout.1",
                          "train.phase2.unfreeze_from"}
    assert all(isinstance(space[k], LogUniformDistribution) for k in ("train.phase1.lr", "train.phase2.lr"))
    assert all(isinstance(space[f"model.head.dropout.{i}"], UniformDistribution) for i in (0, 1))
    unfreeze_from = space["train.phase2.unfreeze_from"]
    assert isinstance(unfreeze_from, CategoricalDistribution) and 0 in unfreeze_from.choices
    # The corners of the space (as the sweeper writes them: key=value) compose and validate.
    for corner in ("low", "high"):
        values = {k: getattr(d, corner) for k, d in space.items() if not isinstance(d, CategoricalDistribution)}
        cfg = compose_config("train", ["run_dir=/r", *(f"{k}={v}" for k, v in values.items())], RunConfig)
        assert list(cfg.model.head.dropout) == [values["model.head.dropout.0"], values["model.head.dropout.1"]]
        assert cfg.train.phase2.lr == values["train.phase2.lr"]
    model_cfg = compose_config("train", ["run_dir=/r", "debug=default"], RunConfig).model
    _, base = build_model(model_cfg)
    for choice in unfreeze_from.choices:
        cfg = compose_config("train", ["run_dir=/r", f"train.phase2.unfreeze_from={choice}"], RunConfig)
        assert unfreeze(base, cfg.train.phase2.unfreeze_from) > 0, choice


@needs("optuna")
def test_optuna_maximises_what_main_returns_the_val_balanced_accuracy(tmp_path, monkeypatch):
    """The real sweeper over dermascan.train.main, in process, with train() stubbed: val and test differ per trial.

    (On the debug config both are 0.125, chance, so the slow test below cannot tell them apart.)
    """
    from hydra.core.global_hydra import GlobalHydra

    from dermascan import train as train_module

    def fake_train(cfg, **kwargs):
        val = float(cfg.train.phase1.lr) * 100  # 0.01 .. 0.3, a different value per trial
        return {"val": {"balanced_accuracy": val}, "test": {"balanced_accuracy": 1 - val}}, {}

    monkeypatch.setattr(train_module, "train", fake_train)
    sweep = tmp_path / "sweep"
    monkeypatch.setattr(sys, "argv", [
        "train", "-m", "hydra/sweeper=optuna_search", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}",
        f"paths.runs_dir={tmp_path / 'runs'}", "tracking.enabled=false", "hydra/job_logging=none",
        "hydra/hydra_logging=none",  # leave the logging of the test process alone
    ])
    try:
        train_module.main()
    finally:
        GlobalHydra.instance().clear()
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    lrs = [OmegaConf.load(sweep / str(i) / ".hydra" / "config.yaml").train.phase1.lr for i in range(3)]
    assert len(set(lrs)) == 3
    assert results.best_value == pytest.approx(max(lrs) * 100)
    assert results.best_params["train.phase1.lr"] == pytest.approx(max(lrs))


# --- Real jobs ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs("submitit")
def test_two_fold_jobs_at_once_on_the_local_launcher_log_complete_runs_to_one_mlflow_server(mlflow_server, tmp_path):
    sweep = tmp_path / "sweep"
    started = time.perf_counter()
    result = train_cli(tmp_path, "hydra/launcher=local", "data.split=kfold", "data.folds=3", "data.fold=0,1",
                       f"tracking.uri={mlflow_server}", f"hydra.sweep.dir={sweep}")
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:] + job_logs(sweep)
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("dermascan")
    # Artifacts go through the server (proxied), not to a path of the jobs' own.
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if "sweep_job" in r.data.tags]
    runs.sort(key=lambda r: int(r.data.tags["sweep_job"]))
    assert [r.data.tags["sweep_job"] for r in runs] == ["0", "1"], [r.data.tags for r in runs]
    for fold, run in enumerate(runs):
        run_dir = sweep / str(fold)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert run.info.status == "FINISHED"
        assert run.data.params["data.split"] == "kfold" and run.data.params["data.fold"] == str(fold)
        assert run.data.tags["sweep"] == str(sweep.resolve())
        for split in ("val", "test"):
            assert run.data.metrics[f"final_{split}_balanced_accuracy"] == pytest.approx(summary[split]["balanced_accuracy"])
        assert len(client.get_metric_history(run.info.run_id, "val_balanced_accuracy")) == 2  # one per epoch
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"report.md", "summary.json", "metrics.json", "history.csv", "plots"} <= artifacts, artifacts
        report = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="report.md",
                                                     tracking_uri=mlflow_server, dst_path=str(tmp_path / f"dl{fold}"))
        assert Path(report).read_text() == (run_dir / "report.md").read_text()
    # The two jobs ran at the same time: each MLflow run started before the other ended.
    first, second = runs
    assert first.info.start_time < second.info.end_time and second.info.start_time < first.info.end_time
    overlap = min(first.info.end_time, second.info.end_time) - max(first.info.start_time, second.info.start_time)
    print(f"2 fold jobs on hydra/launcher=local with an mlflow server: {elapsed:.0f} s; runs overlapped {overlap / 1000:.0f} s")


@pytest.mark.slow
@needs("optuna")
def test_optuna_search_runs_two_trials_and_keeps_the_best_val_balanced_accuracy(tmp_path):
    sweep = tmp_path / "sweep"
    started = time.perf_counter()
    # unfreeze_from given on the command line is fixed, not searched: the debug model stays fast to fine-tune.
    result = train_cli(tmp_path, "hydra/sweeper=optuna_search", "hydra.sweeper.n_trials=2", "tracking.enabled=false",
                       "train.phase2.unfreeze_from=-10", f"hydra.sweep.dir={sweep}")
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1"]  # two trials, no more
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    searched = {"train.phase1.lr", "train.phase2.lr", "model.head.dropout.0", "model.head.dropout.1"}
    assert set(results.best_params) == searched
    vals, trials = [], []
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        vals.append(summary["val"]["balanced_accuracy"])
        cfg = OmegaConf.load(job / "config.yaml")
        assert cfg.train.phase2.unfreeze_from == -10
        assert 1e-4 <= cfg.train.phase1.lr <= 3e-3 and 3e-6 <= cfg.train.phase2.lr <= 3e-4
        assert all(0.1 <= d <= 0.6 for d in cfg.model.head.dropout)
        trials.append({k: OmegaConf.select(cfg, k) for k in ("train.phase1.lr", "train.phase2.lr")} | {
            f"model.head.dropout.{i}": cfg.model.head.dropout[i] for i in (0, 1)})
    assert trials[0] != trials[1]
    # The objective is main's return value, the val balanced accuracy; maximised.
    assert results.best_value == pytest.approx(max(vals))
    best = trials[vals.index(max(vals))]
    if vals[0] != vals[1]:
        assert OmegaConf.to_container(results.best_params) == pytest.approx(best)
    print(f"optuna, 2 trials of the debug config: {elapsed:.0f} s; val balanced accuracy {vals}")
