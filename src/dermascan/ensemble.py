"""``python -m dermascan.ensemble``: average finished runs into one model, evaluate it and export it.

    python -m dermascan.ensemble run_dirs=[runs/train/A,runs/train/B]      # e.g. seeds of one recipe
    python -m dermascan.ensemble sweep_dir=runs/multirun/<timestamp>        # the finished jobs of a sweep (k folds)
    python -m dermascan.ensemble ... out_dir=runs/ensemble/folds evaluate.tta=flips export.tflite=[fp32]

The ensemble is one Keras model that returns the mean of the members'
*calibrated* probabilities (each member's temperature, from its
calibration.json, folded into its logits as ``inference_model`` does). It
looks like a member to the rest of the project: input ``image``, a ``gap``
layer (the members' L2-normalised pooled features, concatenated), a frozen
identity Dense named ``logits`` over log(mean probability), and the softmax
``probabilities``. So ``evaluate`` fits its temperature, the referral
operating point and the out-of-scope gate on it unchanged, ``export`` folds
the temperature into ``logits`` and the gate onto ``gap``, and the service
serves it as it serves one run.

**Held-out data (leakage).** Anything fitted on "val" must be fitted on
images no member trained on. The ensemble's manifest marks as val the images
that are val in every member and train in none; every other image outside
test is train (some member trained on it). The test split must be the same in
every member.

- Members that share a val split (seeds, recipes on one split): the shared
  val is clean; temperature, referral threshold and gate threshold are fitted
  on it, as for one run.
- k-fold members (``data.split=kfold``): each fold's val is the other folds'
  train, so no image outside test is unseen by every member and nothing is
  fitted on the ensemble's own output. No ensemble temperature (each member
  keeps its own, fitted on its own val fold); the referral threshold is
  chosen on out-of-fold probabilities (each image scored by the mean of the
  members that did not train on it: its own fold's member), a proxy for the
  ensemble's scores on unseen images; the out-of-scope gate is the first
  member's own (projection from its train folds, threshold from its own val
  fold), applied to that member's features inside the ensemble, where it
  scores exactly as in the member.

The output folder is a run dir (config.yaml, manifest.csv,
checkpoints/best.keras, metrics.json, report.md, summary.json, export/), so
``python -m dermascan.evaluate``/``export`` and the notebook open it. One
MLflow run, tagged ``stage=ensemble``, ``ensemble_members`` (the members'
MLflow run ids) and ``ensemble_member_run_dirs``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import hydra
import keras
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from dermascan import cli, tracking
from dermascan.artifacts import (
    BEST,
    CALIBRATION,
    CONFIG,
    EXPORT,
    METRICS,
    MLFLOW_RUN_ID,
    OUT_OF_SCOPE,
    REPORT,
    SUMMARY,
    read_json,
    read_temperature,
)
from dermascan.classes import CODES, INDEX
from dermascan.config import (
    EnsembleConfig,
    RunConfig,
    SplitPolicy,
    config_dir,
    validate,
)
from dermascan.data import manifest as manifest_io
from dermascan.errors import ConfigError, DataError
from dermascan.evaluate import ReferralVal, evaluate, overridden, predict
from dermascan.evaluation.metrics import classification_metrics
from dermascan.evaluation.out_of_scope import GivenGate
from dermascan.evaluation.parity import markdown as parity_markdown
from dermascan.evaluation.report import fmt, render_report
from dermascan.export import ExportError, export_keeping_parity
from dermascan.modeling.fit import load_keras
from dermascan.modeling.model import LOGITS_LAYER, inference_model
from dermascan.modeling.ood import FEATURES_LAYER, GATE_LAYER, Gate, load_gate
from dermascan.rundir import Run, load_run
from dermascan.sweep import finished, finished_runs
from dermascan.train import named_formats, run_name

log = logging.getLogger("dermascan.ensemble")

MIN_MEMBERS = 2
MIXTURE = "mixture"  # prefix of the layers that mix the members' log-probabilities (``log_sum_exp``)
SHARED, OUT_OF_FOLD = "shared", "out_of_fold"


@dataclass
class Member:
    """A finished training run, as the ensemble uses it."""

    run: Run
    temperature: Optional[float]  # calibration.json's (None: none fitted)
    mlflow_run_id: Optional[str]
    metrics: dict[str, Any]  # metrics.json ({} when absent)

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir


# --- members ---------------------------------------------------------------------------------------------------


def member_dirs(run_dirs: Sequence[str], sweep_dir: Optional[str]) -> list[Path]:
    """The members' run dirs: ``run_dirs``, or a sweep's finished jobs; DataError/ConfigError when unusable."""
    if run_dirs and sweep_dir:
        raise ConfigError("give run_dirs=[...] or sweep_dir=..., not both")
    if sweep_dir:
        dirs, unfinished = finished_runs(sweep_dir)
        for job in unfinished:
            log.warning("%s has not finished (no %s, or no checkpoint): left out of the ensemble", job, SUMMARY)
        log.info("sweep %s: %d finished job(s)%s", sweep_dir, len(dirs),
                 f", {len(unfinished)} unfinished left out" if unfinished else "")
    else:
        dirs = [Path(d) for d in run_dirs]
        unfinished = [d for d in dirs if not finished(d)]
        if unfinished:
            raise DataError(
                "not finished training run(s): " + ", ".join(str(d) for d in unfinished)
                + f" (each member needs {CONFIG}, {BEST} and {SUMMARY}; a killed run lacks {SUMMARY}: resume it first)"
            )
    if len(dirs) < MIN_MEMBERS:
        raise ConfigError(
            f"an ensemble needs at least {MIN_MEMBERS} finished runs, got {len(dirs)}"
            + (f" in {sweep_dir}" if sweep_dir else "")
            + ": give run_dirs=[runs/train/A,runs/train/B,...] or sweep_dir=runs/multirun/<timestamp>"
        )
    seen: set[Path] = set()
    for d in dirs:
        if d.resolve() in seen:
            log.warning("%s is listed more than once: it counts once per listing in the mean", d)
        seen.add(d.resolve())
    return dirs


def load_member(run_dir: Path) -> Member:
    """A finished run's config, manifest, temperature, MLflow run id and metrics (its model is loaded later)."""
    run = load_run(run_dir)
    id_file = run_dir / MLFLOW_RUN_ID
    member = Member(run, read_temperature(run_dir), id_file.read_text().strip() if id_file.is_file() else None,
                    read_json(run_dir / METRICS, {}))
    log.info("member %s: %d images, temperature %s, MLflow run %s", run_dir, len(run.manifest),
             "none" if member.temperature is None else f"{member.temperature:.3f}", member.mlflow_run_id or "none")
    return member


def check_compatible(members: Sequence[Member]) -> None:
    """ConfigError/DataError naming the first setting in which a member differs from the first member.

    The ensemble feeds every member the same pixels, so they must agree on
    the input size and the resize; and it is scored on one test split, so
    every member's test split must be the same images with the same labels.
    """
    first = members[0]
    for member in members[1:]:
        for key in ("model.image_size", "data.cache.method"):
            mine, theirs = OmegaConf.select(first.run.cfg, key), OmegaConf.select(member.run.cfg, key)
            if mine != theirs:
                raise ConfigError(
                    f"members differ in {key}: {mine} in {first.run_dir}, {theirs} in {member.run_dir}; "
                    "an ensemble feeds every member the same pixels"
                )
        mine, theirs = first.run.cfg.data.cache.size, member.run.cfg.data.cache.size
        if mine != theirs:
            log.warning("members differ in data.cache.size (%s in %s, %s in %s): the ensemble reads images through "
                        "the first member's cache", mine, first.run_dir, theirs, member.run_dir)
        check_same_test(first, member)


def _test_labels(member: Member) -> pd.Series:
    manifest = member.run.manifest
    rows = manifest[manifest["split"] == "test"]
    return rows.set_index("image_id")["label"].fillna("none").sort_index()


def check_same_test(first: Member, member: Member) -> None:
    mine, theirs = _test_labels(first), _test_labels(member)
    only = sorted(set(mine.index) ^ set(theirs.index))
    if only:
        raise DataError(
            f"the members' test splits differ: {len(mine)} test images in {first.run_dir}, {len(theirs)} in "
            f"{member.run_dir}, {len(only)} in only one of them (e.g. {', '.join(only[:3])}). Ensemble runs of one "
            "dataset, split seed and test fraction (k-fold runs share their test split)."
        )
    relabelled = mine.index[mine.to_numpy() != theirs.loc[mine.index].to_numpy()]
    if len(relabelled):
        raise DataError(
            f"the members' test labels differ on {len(relabelled)} image(s) (e.g. {relabelled[0]}: "
            f"{mine[relabelled[0]]} in {first.run_dir}, {theirs[relabelled[0]]} in {member.run_dir})"
        )


# --- the held-out rule -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Splits:
    """The ensemble's manifest, and which members did not train on each of its images."""

    manifest: pd.DataFrame  # split: test as the members', val where no member trained, else train
    unseen: pd.DataFrame  # image_id x member: True where the member did not train on the image (test excluded)
    mixed: int  # images val in some member and train in another: train here

    @property
    def mode(self) -> str:
        val = (self.manifest["split"] == "val") & self.manifest["label"].notna()
        return SHARED if val.any() else OUT_OF_FOLD


def ensemble_splits(members: Sequence[Member]) -> Splits:
    """The ensemble's manifest: test as the members', val = val in every member and train in none, else train."""
    table = pd.concat({i: m.run.manifest.set_index("image_id")["split"] for i, m in enumerate(members)}, axis=1)
    rows = pd.concat([m.run.manifest for m in members]).drop_duplicates("image_id").set_index("image_id")
    rows = rows.loc[table.index]
    trained, tested = table.eq("train").any(axis=1), table.eq("test").any(axis=1)
    rows["split"] = np.where(tested, "test", np.where(trained, "train", "val"))
    unseen = table.eq("val") | table.isna()  # test images are test in every member (check_same_test)
    mixed = int((trained & table.eq("val").any(axis=1)).sum())
    manifest = rows.reset_index()[manifest_io.COLUMNS]
    return Splits(manifest, unseen, mixed)


def val_rule(splits: Splits) -> dict[str, Any]:
    """metrics.json's ``ensemble.val_rule``: which images are held out, and what is fitted on them."""
    split = splits.manifest["split"]
    n_val = int(((split == "val") & splits.manifest["label"].notna()).sum())
    if splits.mode == SHARED:
        text = (f"val = the {n_val} labelled images that are val in every member and train in none (the members "
                "share their val split); the ensemble's temperature, referral threshold and out-of-scope threshold "
                "are fitted on them, as for one run.")
        if splits.mixed:
            text += (f" {splits.mixed} images that are val in some member but train in another are left out of val "
                     "(treated as train).")
        return {"mode": SHARED, "val_images": n_val, "left_out": splits.mixed, "text": text}
    text = ("no image outside test is unseen by every member (k-fold members: each fold's val is the other folds' "
            "train), so nothing is fitted on the ensemble's own output. No ensemble temperature: each member keeps "
            "its own, fitted on its own val. The referral threshold is chosen on out-of-fold probabilities: each "
            "image scored by the mean of the members that did not train on it (for k folds, its own fold's member), "
            "a proxy for the ensemble's scores on unseen images. The out-of-scope gate is the first member's own "
            "(projection from its train split, threshold from its own val), applied inside the ensemble to that "
            "member's features, where it scores exactly as in the member.")
    return {"mode": OUT_OF_FOLD, "val_images": 0, "left_out": splits.mixed, "text": text}


# --- the model -------------------------------------------------------------------------------------------------


def member_model(model: keras.Model, temperature: Optional[float], name: str) -> keras.Model:
    """A member as the ensemble calls it: image -> [logits / T, pooled features (when it has a ``gap`` layer)]."""
    served = inference_model(model, temperature)
    names = {layer.name for layer in served.layers}
    if LOGITS_LAYER not in names:
        raise DataError(f"the member model {model.name} has no {LOGITS_LAYER!r} layer to fold its temperature into")
    outputs = [served.get_layer(LOGITS_LAYER).output]
    if FEATURES_LAYER in names:
        outputs.append(served.get_layer(FEATURES_LAYER).output)
    return keras.Model(served.inputs, outputs, name=name)


def log_sum_exp(terms: Sequence[Any]) -> Any:
    """log(sum_i exp(t_i)) per class of the members' log-probabilities [N, 8] each, from Keras' own layers.

    Stacked as [N, 8, K], log_softmax over the members' axis is t - lse(t),
    so t - log_softmax(t) holds lse in each of its K entries, and a frozen
    Dense of weights 1/K reads it out. Stable for any spread between
    members. Why no custom layer: a model.keras of standard layers loads
    wherever a member's does (``runtime``'s keras predictor, MLflow's keras
    flavour, the notebook) without registering anything new. (A pairwise
    max + softplus(min - max) made the int8 quantizer fail on its Maximum.)
    """
    k, classes = len(terms), int(terms[0].shape[-1])
    columns = [keras.layers.Reshape((classes, 1), name=f"{MIXTURE}_column_{i}")(t) for i, t in enumerate(terms)]
    stacked = keras.layers.Concatenate(axis=-1, name=f"{MIXTURE}_stacked")(columns)
    shares = keras.layers.Activation("log_softmax", name=f"{MIXTURE}_log_shares")(stacked)
    spread = keras.layers.Subtract(name=f"{MIXTURE}_lse")([stacked, shares])
    mean = keras.layers.Dense(1, use_bias=False, kernel_initializer=keras.initializers.Constant(1.0 / k),
                              trainable=False, name=f"{MIXTURE}_read")(spread)
    return keras.layers.Reshape((classes,), name=f"{MIXTURE}_log_sum")(mean)


def build_ensemble(models: Sequence[keras.Model], temperatures: Sequence[Optional[float]]) -> keras.Model:
    """One model returning the mean of the members' calibrated probabilities (see the module docstring).

    log(mean_i p_i) = logsumexp_i(log p_i) - log K, and softmax ignores the
    constant, so the output is exactly the mean. The identity ``logits``
    layer lets ``inference_model`` fold the ensemble's own temperature:
    softmax(log(mean p) / T). ``gap`` reaches the output through a frozen
    all-zero Dense, which adds exactly 0: a Functional model keeps only the
    layers on the way to its output, and evaluation and export look ``gap`` up.
    """
    size = tuple(models[0].inputs[0].shape[1:])
    image = keras.Input(size, name="image")
    log_p, features = [], []
    for i, (model, temperature) in enumerate(zip(models, temperatures)):
        if tuple(model.inputs[0].shape[1:]) != size or model.outputs[0].shape[-1] != len(CODES):
            raise DataError(
                f"member {i} takes {tuple(model.inputs[0].shape[1:])} and returns {model.outputs[0].shape[-1]} "
                f"classes; member 0 takes {size}, and an ensemble needs the {len(CODES)} classes in every member"
            )
        outputs = member_model(model, temperature, f"member_{i}")(image)
        log_p.append(keras.layers.Activation("log_softmax", dtype="float32", name=f"{MIXTURE}_log_p_{i}")(outputs[0]))
        if len(outputs) > 1:
            # named as the gate's layers: int8_full keeps them in float (export.int8_float_layers), as a unit
            # vector in int8's fixed 1/128 steps loses the features the gate measures
            features.append(keras.layers.UnitNormalization(dtype="float32", name=f"{GATE_LAYER}_features_{i}")(
                outputs[1]))
    mixed = log_sum_exp(log_p)
    if len(features) == len(models):
        pooled = keras.layers.Concatenate(name=FEATURES_LAYER)(features)
        zero = keras.layers.Dense(len(CODES), use_bias=False, kernel_initializer="zeros", trainable=False,
                                  name=f"{MIXTURE}_features_zero")(pooled)
        mixed = keras.layers.Add(name=f"{MIXTURE}_with_features")([mixed, zero])
    else:
        log.warning("not every member has a %r layer: the ensemble has no pooled features, so no out-of-scope gate",
                    FEATURES_LAYER)
    logits = keras.layers.Dense(len(CODES), kernel_initializer="identity", bias_initializer="zeros", trainable=False,
                                name=LOGITS_LAYER)(mixed)
    probabilities = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(logits)
    return keras.Model(image, probabilities, name="dermascan_ensemble")


# --- held out for k-fold members -------------------------------------------------------------------------------


def out_of_fold(members: Sequence[Member], models: Sequence[keras.Model], splits: Splits, image_size: int,
                batch_size: int, cache: dict[str, Any]) -> tuple[pd.DataFrame, np.ndarray]:
    """Every labelled image outside test that some member did not train on, and the mean of those members'
    calibrated probabilities of it (single view, as the exported model)."""
    manifest = splits.manifest.set_index("image_id", drop=False)
    unseen = splits.unseen.loc[manifest.index]
    keep = unseen.any(axis=1).to_numpy() & manifest["label"].notna().to_numpy()
    rows, unseen = manifest[keep].reset_index(drop=True), unseen[keep].to_numpy()
    total = np.zeros((len(rows), len(CODES)))
    for i, member in enumerate(members):
        mine = unseen[:, i]
        if not mine.any():
            continue
        log.info("out-of-fold: member %d predicts the %d images it did not train on ...", i, int(mine.sum()))
        served = inference_model(models[i], member.temperature)
        total[mine] += predict(served, rows[mine].reset_index(drop=True), image_size, batch_size, cache)
    return rows, total / unseen.sum(axis=1, keepdims=True)


def out_of_fold_referral(members: Sequence[Member], models: Sequence[keras.Model], splits: Splits, image_size: int,
                         batch_size: int, cache: dict[str, Any]) -> tuple[ReferralVal, dict[str, Any]]:
    """The referral threshold's images and probabilities (``out_of_fold``), and metrics.json's ``ensemble.out_of_fold``."""
    rows, probabilities = out_of_fold(members, models, splits, image_size, batch_size, cache)
    scored = classification_metrics(rows["label"].map(INDEX).to_numpy(), probabilities) if len(rows) else {}
    log.info("out-of-fold: %d images, balanced accuracy %s", len(rows), fmt(scored.get("balanced_accuracy")))
    source = ("out-of-fold probabilities (each image scored by the mean of the members that did not train on it, "
              "each with its own temperature)")
    return ReferralVal(rows, probabilities, source), {
        "n": len(rows), "balanced_accuracy": scored.get("balanced_accuracy"), "mean_auc": scored.get("mean_auc")}


def member_gate(members: Sequence[Member], model: keras.Model) -> Optional[GivenGate]:
    """The first member's own gate, embedded in the ensemble's ``gap`` (the members' unit features concatenated).

    unit(gap) = gap / sqrt(K), whose first block is the member's unit features;
    so the projection [sqrt(K) P; 0] gives exactly the member's projected
    features, and the gate scores as it does in the member. None (with a
    warning) when the member has no gate or the ensemble no ``gap``.
    """
    first = members[0]
    gate = load_gate(first.run_dir / OUT_OF_SCOPE)
    if gate is None or FEATURES_LAYER not in {layer.name for layer in model.layers}:
        log.warning("out-of-scope gate: %s has no %s (or the ensemble no %r layer), and no image is unseen by every "
                    "member to fit one on: the ensemble has no gate", first.run_dir, OUT_OF_SCOPE, FEATURES_LAYER)
        return None
    width = int(model.get_layer(FEATURES_LAYER).output.shape[-1])
    k = len(members)
    projection = np.zeros((width, gate.projection.shape[1]))
    projection[: gate.projection.shape[0]] = math.sqrt(k) * gate.projection
    embedded = Gate(projection, gate.centres, gate.threshold, gate.keep, gate.n_train, gate.n_val)
    manifest = first.run.manifest
    val_rows = manifest[(manifest["split"] == "val") & manifest["label"].notna()].reset_index(drop=True)
    source = (f"member 0's own gate ({first.run_dir}: projection from its {gate.n_train} train images, threshold from "
              f"its {gate.n_val} val images, which it did not train on), on member 0's features")
    return GivenGate(embedded, val_rows, source)


# --- the report ------------------------------------------------------------------------------------------------


def member_figures(member: Member, split: str) -> dict[str, Any]:
    """One member's own evaluation (its metrics.json), as the side-by-side table shows it."""
    metrics = member.metrics
    same = metrics.get("split") == split
    test = metrics.get(split) if same else None
    referral = metrics.get("referral") or {}
    gate = metrics.get("out_of_scope") or {}
    return {
        "run_dir": str(member.run_dir),
        "mlflow_run_id": member.mlflow_run_id,
        "temperature": member.temperature,
        "data_split": str(member.run.cfg.data.split),
        "fold": OmegaConf.select(member.run.cfg, "data.fold", default=None),
        "seed": member.run.cfg.seed,
        "val": _headline(metrics.get("val")),
        split: _headline(test),
        "referral": None if not same or "threshold" not in referral else {
            "threshold": referral["threshold"],
            "sensitivity": (referral.get(split) or {}).get("sensitivity", {}).get("estimate"),
            "specificity": (referral.get(split) or {}).get("specificity", {}).get("estimate"),
        },
        f"{split}_rejected": gate.get(f"{split}_rejected") if same else None,
    }


def _headline(metrics: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    if not metrics:
        return None
    ci = ((metrics.get("ci") or {}).get("balanced_accuracy") or {})
    return {"n": metrics.get("n"), "balanced_accuracy": metrics.get("balanced_accuracy"),
            "balanced_accuracy_ci": [ci.get("low"), ci.get("high")] if ci.get("low") is not None else None,
            "mean_auc": metrics.get("mean_auc"), "top1_accuracy": metrics.get("top1_accuracy"),
            "expected_calibration_error": metrics.get("expected_calibration_error")}


def _ba(figures: Optional[dict[str, Any]]) -> str:
    if not figures:
        return "n/a"
    ci = figures.get("balanced_accuracy_ci")
    return fmt(figures["balanced_accuracy"]) + (f" ({fmt(ci[0])} - {fmt(ci[1])})" if ci else "")


def side_by_side(rows: Sequence[tuple[str, dict[str, Any]]], split: str) -> list[str]:
    """The members and the ensemble, one row each: val and ``split`` figures, referral and gate."""
    lines = [
        f"| model | temperature | val BA (own val) | {split} BA (95% CI) | {split} mean AUC | {split} top-1 "
        f"| {split} ECE | referral sensitivity / specificity ({split}) | out of scope ({split}) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in rows:
        test, referral = f.get(split) or {}, f.get("referral") or {}
        rejected = f.get(f"{split}_rejected")
        lines.append(
            f"| {name} | {fmt(f.get('temperature'))} | {fmt((f.get('val') or {}).get('balanced_accuracy'))} "
            f"| {_ba(f.get(split))} | {fmt(test.get('mean_auc'))} | {fmt(test.get('top1_accuracy'))} "
            f"| {fmt(test.get('expected_calibration_error'))} "
            f"| {fmt(referral.get('sensitivity'))} / {fmt(referral.get('specificity'))} "
            f"| {'n/a' if rejected is None else f'{rejected:.1%}'} |"
        )
    return lines


def ensemble_section(info: dict[str, Any], result: dict[str, Any], split: str) -> str:
    """report.md's first section: what was averaged, the held-out rule, and the members beside the ensemble."""
    figures = ensemble_figures(result, split)
    rows = [(f"member {i}: `{Path(m['run_dir']).name}`" + (f" (fold {m['fold']})" if m["data_split"] == "kfold" else ""),
             m) for i, m in enumerate(info["members"])]
    lines = [
        f"# Ensemble of {len(info['members'])} runs",
        "",
        info["method"],
        "",
        f"**Held-out data ({info['val_rule']['mode']}).** {info['val_rule']['text']}",
        "",
        f"Each member's figures are its own evaluation (its metrics.json; val is its own val split); the ensemble's "
        f"are below, on the same {split} split.",
        "",
        *side_by_side([*rows, ("**ensemble**", figures)], split),
        "",
    ]
    oof = info.get("out_of_fold")
    if oof:
        lines += [f"Out-of-fold ({oof['n']} images, each scored by the members that did not train on it): balanced "
                  f"accuracy {fmt(oof['balanced_accuracy'])}, mean AUC {fmt(oof['mean_auc'])}.", ""]
    return "\n".join(lines) + "\n"


def ensemble_figures(result: dict[str, Any], split: str) -> dict[str, Any]:
    referral, gate = result.get("referral") or {}, result.get("out_of_scope") or {}
    return {
        "temperature": (result.get("calibration") or {}).get("temperature"),
        "val": _headline(result.get("val")),
        split: _headline(result.get(split)),
        "referral": None if "threshold" not in referral else {
            "sensitivity": referral[split]["sensitivity"].get("estimate"),
            "specificity": referral[split]["specificity"].get("estimate"),
        },
        f"{split}_rejected": gate.get(f"{split}_rejected"),
    }


# --- the run ---------------------------------------------------------------------------------------------------


def ensemble_config(first: DictConfig, cfg: DictConfig, overrides: Sequence[str], out_dir: Path) -> DictConfig:
    """The ensemble run dir's config.yaml: the first member's (its experiment's evaluation, export and MLflow
    store), with the command line's ``evaluate.*``, ``export.*`` and ``tracking.*`` overrides over it (as
    ``python -m dermascan.evaluate`` applies ``evaluate.*`` over its run's), and this command's paths, seed and
    run dir."""
    changed = [o for group in ("evaluate", "export", "tracking") for o in overridden(overrides, group)]
    merged = OmegaConf.merge(
        OmegaConf.to_container(first),
        OmegaConf.from_dotlist(changed),
        {"paths": OmegaConf.to_container(cfg.paths, resolve=True), "run_dir": str(out_dir),
         "seed": first.seed if cfg.seed is None else cfg.seed},
    )
    return validate(merged, RunConfig)


def check_out_dir(out_dir: Path, members: Sequence[Path]) -> None:
    for d in members:
        if out_dir.resolve() == d.resolve() or out_dir.resolve().is_relative_to(d.resolve()):
            raise ConfigError(f"out_dir={out_dir} is inside the member run dir {d}; give another out_dir")
    for name in (BEST, SUMMARY):
        if (out_dir / name).exists():
            raise ConfigError(f"out_dir={out_dir} already holds a run ({name}); give another out_dir")


def write_run_dir(out_dir: Path, run_cfg: DictConfig, splits: Splits, members: Sequence[Member],
                  model: keras.Model) -> None:
    """config.yaml, manifest.csv (+ manifest_summary.json) and checkpoints/best.keras: what load_run reads."""
    (out_dir / BEST).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(run_cfg, out_dir / CONFIG, resolve=True)
    summary = dict(members[0].run.summary)
    summary["counts"] = manifest_io.counts(splits.manifest)
    summary["ensemble_split"] = ("test: the members'; val: val in every member and train in none; train: "
                                 "trained on by some member")
    manifest_io.write(splits.manifest, summary, out_dir)
    model.save(out_dir / BEST)


def ensemble(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Build, evaluate, export and track the ensemble of ``cfg.run_dirs`` (or ``cfg.sweep_dir``'s finished runs);
    return metrics.json's content. ``overrides``: the command line's (``evaluate.*``, ``export.*`` and
    ``tracking.*`` apply over the first member's settings)."""
    started = time.perf_counter()
    dirs = member_dirs(list(cfg.run_dirs), cfg.sweep_dir)
    out_dir = Path(cfg.out_dir)
    check_out_dir(out_dir, dirs)
    members = [load_member(d) for d in dirs]
    check_compatible(members)
    first = members[0].run
    run_cfg = ensemble_config(first.cfg, cfg, overrides, out_dir)
    if cfg.log_to_mlflow:
        tracking.check_store(run_cfg.tracking)
    settings, image_size, cache = run_cfg.evaluate, int(run_cfg.model.image_size), first.cache
    splits = ensemble_splits(members)
    rule = val_rule(splits)
    log.info("held-out rule %s: %s", rule["mode"], rule["text"])

    log.info("building the ensemble of %d members ...", len(members))
    models = [m.run.model() for m in members]
    model = build_ensemble(models, [m.temperature for m in members])
    write_run_dir(out_dir, run_cfg, splits, members, model)
    best = load_keras(out_dir / BEST)  # what python -m dermascan.evaluate / export will load
    referral_val, gate, oof = None, None, None
    if rule["mode"] == OUT_OF_FOLD:
        referral_val, oof = out_of_fold_referral(members, models, splits, image_size, settings.batch_size, cache)
        gate = member_gate(members, best)

    info = {
        "method": (f"The mean of the {len(members)} members' calibrated probabilities (each member's temperature, "
                   "from its calibration.json, inside the model), then the ensemble's own temperature when one is "
                   "fitted."),
        "members": [member_figures(m, settings.split) for m in members],
        "val_rule": rule,
        **({"out_of_fold": oof} if oof else {}),
    }
    tags = {"ensemble_members": ",".join(m.mlflow_run_id or "none" for m in members),
            "ensemble_member_run_dirs": ",".join(str(m.run_dir.resolve()) for m in members),
            "ensemble_val_rule": rule["mode"]}
    context = (tracking.run(run_cfg, out_dir, run_name(run_cfg, out_dir), stage="ensemble", tags=tags)
               if cfg.log_to_mlflow else nullcontext(None))
    with context as run_id:
        result, failure = _evaluate_and_export(best, splits, run_cfg, out_dir, info, referral_val, gate, started,
                                               named_formats(overrides, run_cfg))
        if run_id is not None:
            temperature = result["calibration"].get("temperature")
            tracking.log_finished_run(run_cfg, out_dir, read_json(out_dir / SUMMARY),
                                      lambda: inference_model(best, temperature))
    if failure is not None:
        raise failure
    m = result[settings.split]
    log.info("ensemble of %d: %s balanced accuracy %.3f, mean AUC %s, in %.0f s; run dir %s", len(members),
             settings.split, m["balanced_accuracy"], fmt(m["mean_auc"]), time.perf_counter() - started, out_dir)
    return result


def _evaluate_and_export(
    best: keras.Model, splits: Splits, run_cfg: DictConfig, out_dir: Path, info: dict[str, Any],
    referral_val: Optional[ReferralVal], gate: Optional[GivenGate], started: float, required: Sequence[str] = (),
) -> tuple[dict[str, Any], Optional[ExportError]]:
    """evaluate, then metrics.json and report.md with the ensemble's section, export, summary.json.

    As in train, a TFLite format that fails the parity gate is dropped with a
    warning unless ``required`` (named on the command line): then the export
    fails, and the failure is returned, not raised, so that everything else is
    written and logged first.
    """
    settings, split = run_cfg.evaluate, run_cfg.evaluate.split
    if info["val_rule"]["mode"] == OUT_OF_FOLD:
        settings = OmegaConf.merge(settings, {"temperature_scaling": False})
    log.info("evaluating the ensemble on %s ...", split)
    result = evaluate(best, splits.manifest, settings, int(run_cfg.model.image_size),
                      OmegaConf.to_container(run_cfg.data.cache, resolve=True), out_dir, seed=int(run_cfg.seed),
                      isic2018=run_cfg.data.split == SplitPolicy.official, referral_val=referral_val, gate=gate)
    if info["val_rule"]["mode"] == OUT_OF_FOLD:
        result["calibration"] = {"temperature": None, "skipped": "no image is unseen by every member; each member's "
                                 "own temperature is inside the ensemble"}
        (out_dir / CALIBRATION).write_text(json.dumps(result["calibration"], indent=2))
    result["ensemble"] = info
    (out_dir / METRICS).write_text(json.dumps(result, indent=2))
    report = ensemble_section(info, result, split) + "\n" + render_report(result)

    failure, parity = None, None
    if not run_cfg.export.enabled:
        log.warning("export.enabled is false (the first member's setting, or the command line's): no export; "
                    "pass export.enabled=true, or run python -m dermascan.export run_dir=%s", out_dir)
    else:
        log.info("exporting the ensemble to %s ...", out_dir / EXPORT)
        parity, failure = export_keeping_parity(Run(out_dir, run_cfg, splits.manifest), best, run_cfg.export, result,
                                                required)
        if parity is not None:
            report += "\n" + parity_markdown(parity)
            tracking.log_export(parity)
    (out_dir / REPORT).write_text(report)
    summary = {
        "val": result.get("val"),
        split: result[split],
        "ensemble": {"members": [m["run_dir"] for m in info["members"]], "val_rule": info["val_rule"]["mode"]},
        "export_dropped": dict(parity.get("dropped", [])) if parity else {},
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
    return result, failure


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="ensemble")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    cli.run(lambda c: ensemble(c, overrides), cfg, EnsembleConfig)


if __name__ == "__main__":
    main()
