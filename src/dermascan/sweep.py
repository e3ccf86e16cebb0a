"""A Hydra sweep's run dirs, and its summary: ``python -m dermascan.sweep sweep_dir=runs/multirun/<timestamp>``.

A sweep folder holds one numbered run dir per job (``<sweep>/0``, ``<sweep>/1``,
...; ``hydra.sweep.subdir``), whichever launcher ran them. A job that has
not finished yet (or was killed) has no ``summary.json``.

The summary groups the finished jobs by recipe (their overrides other than
``data.fold`` and ``seed``) and gives each recipe's mean ± sd of the val and
test figures, in ``sweep_summary.md``/``.json`` in the sweep folder and in
an MLflow parent run per recipe, under which its runs are nested. Hydra
writes it at the end of every ``-m`` sweep (``SweepSummary``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import hydra
import mlflow
import numpy as np
from hydra.experimental.callback import Callback
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from dermascan import cli
from dermascan.artifacts import BEST, CONFIG, MLFLOW_RUN_ID, SUMMARY, read_json
from dermascan.config import SweepRunConfig, config_dir
from dermascan.errors import DataError, DermascanError

log = logging.getLogger("dermascan.sweep")


def finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a finished training run (config, best checkpoint and summary written)."""
    return all((run_dir / name).is_file() for name in (CONFIG, BEST, SUMMARY))


def job_dirs(sweep_dir: str | Path) -> list[Path]:
    """Every job folder of the sweep (finished or not), in job order; DataError if there is none."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise DataError(f"{sweep_dir} is not a directory; give the sweep folder of a python -m dermascan.train -m run")
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and (p / CONFIG).is_file()]
    if not jobs:
        raise DataError(
            f"{sweep_dir} holds no training run dirs (sub-folders with {CONFIG}); give the sweep folder of a "
            "python -m dermascan.train -m run (runs/multirun/<timestamp>)"
        )
    return sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def finished_runs(sweep_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """(finished, unfinished) job folders of the sweep, each in job order."""
    jobs = job_dirs(sweep_dir)
    return [p for p in jobs if finished(p)], [p for p in jobs if not finished(p)]


# Settings that repeat one recipe (its replicates): runs that differ only in
# these are summarised together, as mean ± sd. Overrides under NOT_RECIPE
# say where a run writes, not what it trains, and do not name its recipe.
REPLICATE_KEYS = ("data.fold", "seed")
NOT_RECIPE = ("paths.", "tracking.", "run_dir", "hydra.")
SUMMARY_JSON = "sweep_summary.json"
SUMMARY_MD = "sweep_summary.md"
# Per split: (summary.json key, column heading).
FIGURES = (("balanced_accuracy", "balanced accuracy"), ("mean_auc", "mean AUC"), ("top1_accuracy", "top-1 accuracy"))


def job_overrides(run_dir: Path) -> list[str]:
    """The job's command-line overrides (Hydra's ``.hydra/overrides.yaml``), or none."""
    path = run_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.is_file() else []


def recipe_of(overrides: list[str]) -> str:
    """What the job's overrides set besides its replicate keys: the recipe it repeats ('' for the base recipe)."""
    keys = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    kept = [o for o, key in zip(overrides, keys) if key not in REPLICATE_KEYS and not key.startswith(NOT_RECIPE)]
    return " ".join(sorted(kept))


def run_record(run_dir: Path) -> dict[str, Any]:
    """One finished job: where it is, its fold and seed, its MLflow run, and its val and test figures."""
    cfg = OmegaConf.load(run_dir / CONFIG)
    summary = read_json(run_dir / SUMMARY, {})
    split = str(cfg.evaluate.split)
    record: dict[str, Any] = {
        "job": run_dir.name,
        "run_dir": str(run_dir.resolve()),
        "recipe": recipe_of(job_overrides(run_dir)),
        "fold": int(cfg.data.fold) if str(cfg.data.get("split")) == "kfold" else None,
        "seed": int(cfg.seed),
        "test_split": split,
        "mlflow_run_id": (run_dir / MLFLOW_RUN_ID).read_text().strip() if (run_dir / MLFLOW_RUN_ID).is_file() else None,
    }
    for name, part in (("val", summary.get("val")), ("test", summary.get(split))):
        for key, _ in FIGURES:
            record[f"{name}_{key}"] = (part or {}).get(key)
    return record


def mean_sd(values: list[Optional[float]]) -> dict[str, Optional[float]]:
    """Mean and sample standard deviation (ddof 1; None for fewer than 2 values) of the values that exist."""
    present = np.array([v for v in values if v is not None], dtype=float)
    if present.size == 0:
        return {"mean": None, "sd": None, "n": 0}
    sd = float(present.std(ddof=1)) if present.size > 1 else None
    return {"mean": float(present.mean()), "sd": sd, "n": int(present.size)}


def summarise(sweep_dir: str | Path) -> dict[str, Any]:
    """Every finished job of the sweep, grouped by recipe, with mean ± sd of each val and test figure."""
    done, unfinished = finished_runs(sweep_dir)
    if not done:
        raise DataError(f"no job of the sweep in {sweep_dir} has finished (no {SUMMARY} in any job folder)")
    records = [run_record(run_dir) for run_dir in done]
    groups = []
    for recipe in sorted({r["recipe"] for r in records}):
        members = [r for r in records if r["recipe"] == recipe]
        stats = {f"{split}_{key}": mean_sd([m[f"{split}_{key}"] for m in members])
                 for split in ("val", "test") for key, _ in FIGURES}
        groups.append({"recipe": recipe, "runs": members, "stats": stats})
    return {"sweep_dir": str(Path(sweep_dir).resolve()), "groups": groups,
            "unfinished": [str(p.resolve()) for p in unfinished]}


def _cell(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _stat(stat: dict[str, Optional[float]]) -> str:
    if stat["mean"] is None:
        return "n/a"
    return _cell(stat["mean"]) if stat["sd"] is None else f"{stat['mean']:.3f} ± {stat['sd']:.3f}"


def markdown(summary: dict[str, Any]) -> str:
    """The summary as sweep_summary.md: one table per recipe, its runs, then mean ± sd."""
    lines = [f"# Sweep summary: {summary['sweep_dir']}", ""]
    lines += [
        "Balanced accuracy is the official ISIC metric (the mean of the per-class sensitivities). ± is the sample "
        "standard deviation across the runs of one recipe. In a k-fold sweep every fold is scored on the same "
        "held-out test split, so the spread is the variation between models trained on different folds, not "
        "test-sampling error (each run's report gives its bootstrap CI).", "",
    ]
    headings = [f"{split} {heading}" for split in ("val", "test") for _, heading in FIGURES]
    for group in summary["groups"]:
        lines += [f"## Recipe: {group['recipe'] or 'the base config'}", ""]
        lines += ["| job | fold | seed | " + " | ".join(headings) + " |", "|" + "---|" * (3 + len(headings))]
        for run in group["runs"]:
            cells = [_cell(run[f"{split}_{key}"]) for split in ("val", "test") for key, _ in FIGURES]
            fold = "-" if run["fold"] is None else str(run["fold"])
            lines.append(f"| {run['job']} | {fold} | {run['seed']} | " + " | ".join(cells) + " |")
        stats = [_stat(group["stats"][f"{split}_{key}"]) for split in ("val", "test") for key, _ in FIGURES]
        lines += [f"| **mean ± sd ({len(group['runs'])} runs)** | | | " + " | ".join(stats) + " |", ""]
    if summary["unfinished"]:
        lines += ["## Unfinished jobs (not in the figures above)", ""]
        lines += [f"- {path}" for path in summary["unfinished"]] + [""]
    return "\n".join(lines)


def log_to_mlflow(summary: dict[str, Any], tracking_cfg: DictConfig, previous: dict[str, Any]) -> None:
    """One MLflow parent run per recipe, holding mean ± sd; the recipe's runs become its children.

    The parent is named after the sweep folder (``multirun/<timestamp> [recipe]``)
    and its runs are nested under it in the MLflow UI (the ``mlflow.parentRunId``
    tag). Summarising the same sweep again (after a resumed job) updates the
    same parent runs, whose ids sweep_summary.json keeps.
    """
    if not tracking_cfg.enabled:
        return
    mlflow.set_tracking_uri(tracking_cfg.uri)
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(tracking_cfg.experiment)
    if experiment is None:
        log.warning("MLflow experiment %r not found at %s: no parent run logged", tracking_cfg.experiment, tracking_cfg.uri)
        return
    known = {g["recipe"]: g.get("mlflow_parent_run_id") for g in previous.get("groups", [])}
    name = Path(summary["sweep_dir"]).name
    for group in summary["groups"]:
        parent_id = known.get(group["recipe"])
        if parent_id is None:
            run_name = f"sweep {name}" + (f" [{group['recipe']}]" if group["recipe"] else "")
            parent = client.create_run(experiment.experiment_id, run_name=run_name,
                                       tags={"stage": "sweep", "sweep": summary["sweep_dir"], "recipe": group["recipe"]})
            parent_id = parent.info.run_id
        group["mlflow_parent_run_id"] = parent_id
        metrics = {f"{figure}_{k}": v for figure, stat in group["stats"].items() for k, v in stat.items() if v is not None}
        for key, value in metrics.items():
            client.log_metric(parent_id, key, float(value))
        client.set_terminated(parent_id, "FINISHED")
        for run in group["runs"]:
            if run["mlflow_run_id"]:
                client.set_tag(run["mlflow_run_id"], "mlflow.parentRunId", parent_id)
        log.info("MLflow parent run %s holds %d run(s) of recipe %r", parent_id, len(group["runs"]), group["recipe"])


def write_summary(sweep_dir: str | Path, to_mlflow: bool = True) -> dict[str, Any]:
    """Summarise the sweep into <sweep_dir>/sweep_summary.{json,md} (and MLflow); return the summary."""
    sweep_dir = Path(sweep_dir)
    summary = summarise(sweep_dir)
    if to_mlflow:
        first = OmegaConf.load(Path(summary["groups"][0]["runs"][0]["run_dir"]) / CONFIG)
        log_to_mlflow(summary, first.tracking, read_json(sweep_dir / SUMMARY_JSON, {}))
    (sweep_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=2))
    (sweep_dir / SUMMARY_MD).write_text(markdown(summary))
    for group in summary["groups"]:
        stats = group["stats"]
        log.info("recipe %r: %d run(s), val balanced accuracy %s, test balanced accuracy %s",
                 group["recipe"] or "base", len(group["runs"]), _stat(stats["val_balanced_accuracy"]),
                 _stat(stats["test_balanced_accuracy"]))
    if summary["unfinished"]:
        log.warning("%d job(s) have not finished and are left out: %s; resume them by running the same command "
                    "with hydra.sweep.dir=%s", len(summary["unfinished"]), ", ".join(summary["unfinished"]), sweep_dir)
    log.info("wrote %s and %s", sweep_dir / SUMMARY_MD, sweep_dir / SUMMARY_JSON)
    return summary


class SweepSummary(Callback):
    """Hydra callback (``configs/train.yaml``): at the end of a ``-m`` sweep, write its summary.

    Runs in the launching process, whichever launcher ran the jobs. A sweep
    that stops on a failed job ends without it: ``python -m dermascan.sweep
    sweep_dir=...`` writes it then.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            write_summary(sweep_dir)
        except (DermascanError, MlflowException, OSError) as err:
            log.error("could not summarise the sweep in %s: %s (python -m dermascan.sweep sweep_dir=%s retries)",
                      sweep_dir, err, sweep_dir)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="sweep")
def main(cfg: DictConfig) -> None:
    cli.run(lambda c: write_summary(c.sweep_dir, to_mlflow=c.log_to_mlflow), cfg, SweepRunConfig)


if __name__ == "__main__":
    main()
