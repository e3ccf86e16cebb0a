"""Evaluation of a trained model: predictions, metrics with CIs, calibration, plots, report.

    python -m dermascan.evaluate run_dir=runs/train/<timestamp>                 # re-evaluate a finished run
    python -m dermascan.evaluate run_dir=... evaluate.split=val evaluate.tta=flips
    python -m dermascan.evaluate export_dir=.../export manifest=.../manifest.csv out_dir=...

Writes, in the output folder (the run dir by default):

- ``predictions.csv``: exactly ``image`` and one probability column per class
  (the ISIC submission layout); ``ground_truth.csv``: the truth of its
  labelled images, one-hot, in the official ground-truth layout
  (``dermascan.evaluation.scoring``).
- ``predictions_isic2018.csv`` and ``ground_truth_isic2018.csv``: the ISIC 2018
  Test images in the 2018 7-class layout (AKIEC = AK + SCC), when the split
  holds them.
- ``metrics.json``: every metric of ``dermascan.evaluation.metrics``, named exactly,
  with bootstrap CIs, calibration and the TTA comparison; ``referral``: the
  referral threshold chosen on val and its rates on the split
  (``dermascan.evaluation.referral``); ``subgroups``: metrics per age band,
  sex, site and collection (``dermascan.evaluation.subgroups``).
- ``calibration.json``: the temperature fitted on val (export applies it).
- ``out_of_scope.npz``: the out-of-scope gate (``dermascan.modeling.ood``),
  fitted on the train split's pooled features, its threshold on val's;
  ``metrics.json["out_of_scope"]`` its figures against offline
  out-of-scope sets (``dermascan.evaluation.ood``), and
  ``out_of_scope_scores.csv`` every image's score. In a training run that is
  the run dir, which export reads; a re-evaluation writes its own gate into
  its own output folder and leaves the run's alone.
- ``report.md`` and ``plots/``: ROC curves, confusion matrices, reliability
  diagram, the referral score's ROC with its operating point, the subgroups,
  the out-of-scope score's histograms.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import hydra
import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from dermascan import cli, tracking
from dermascan.artifacts import (
    CALIBRATION,
    CONFUSION_MATRIX,
    GROUND_TRUTH,
    GROUND_TRUTH_2018,
    KERAS_MODEL,
    METRICS,
    PLOTS,
    PREDICTIONS,
    PREDICTIONS_2018,
    REFERRAL_ROC,
    RELIABILITY,
    REPORT,
    ROC_CURVES,
    SUBGROUPS_PLOT,
    eval_dir,
    read_labels,
    read_temperature,
)
from dermascan.classes import CODES, INDEX
from dermascan.config import (
    EvaluateRunConfig,
    RunConfig,
    SplitPolicy,
    config_dir,
    validate,
)
from dermascan.data.manifest import evaluation_rows
from dermascan.data.manifest import read as read_manifest
from dermascan.errors import ConfigError, DataError
from dermascan.evaluation import plots, scoring
from dermascan.evaluation.calibration import (
    TEMPERATURE_BOUNDS,
    apply_temperature,
    fit_temperature,
)
from dermascan.evaluation.metrics import (
    CODES_2018,
    binary_accuracy,
    bootstrap_ci,
    classification_metrics,
    expected_calibration_error,
    reliability_bins,
    to_isic2018,
)
from dermascan.evaluation.out_of_scope import GivenGate, evaluate_out_of_scope
from dermascan.evaluation.referral import (
    class_indices,
    needs_referral,
    operating_point,
    referral_codes,
    referral_score,
)
from dermascan.evaluation.report import render_report
from dermascan.evaluation.subgroups import evaluate_subgroups
from dermascan.modeling.fit import load_keras
from dermascan.modeling.inputs import evaluation_images
from dermascan.rundir import load_run
from dermascan.runtime import PROBABILITIES, named_outputs

log = logging.getLogger("dermascan.evaluate")


Transform = Callable[[tf.Tensor], tf.Tensor]


def _flip_h(x: tf.Tensor) -> tf.Tensor:
    return tf.reverse(x, axis=[2])


def _rot90(k: int) -> Transform:
    return lambda x: tf.image.rot90(x, k)


TTA: dict[str, list[Transform]] = {
    "none": [tf.identity],
    # the four flips: identity, horizontal, vertical, both
    "flips": [tf.identity, _flip_h, lambda x: tf.reverse(x, axis=[1]), lambda x: tf.reverse(x, axis=[1, 2])],
    # the eight symmetries of the square: four rotations, each with and without a horizontal flip
    "flips_rot90": [f for k in range(4) for f in (_rot90(k), lambda x, k=k: _rot90(k)(_flip_h(x)))],
}


def predict(
    model: keras.Model, frame: pd.DataFrame, image_size: int, batch_size: int, cache: dict[str, Any], tta: str = "none"
) -> np.ndarray:
    """Softmax probabilities [N, 8] for the manifest rows of ``frame``, in order, averaged over the TTA views."""
    if tta not in TTA:
        raise ValueError(f"unknown evaluate.tta {tta!r}; choose one of {', '.join(TTA)}")
    data = evaluation_images(frame, image_size, batch_size, cache)
    # an exported model with its out-of-scope gate has two named outputs: the probabilities are one
    views = [named_outputs(model.predict(data.map(lambda images, t=t: t(images)), verbose=0))[PROBABILITIES]
             for t in TTA[tta]]
    return np.mean(views, axis=0)


def score(labels: pd.Series, probabilities: np.ndarray, n_resamples: int, seed: int, n_bins: int) -> dict[str, Any]:
    """Metrics of one set of predictions over the rows with an 8-class label."""
    known = labels.notna().to_numpy()
    truth = labels[known].map(INDEX).to_numpy()
    p = probabilities[known]
    metrics = classification_metrics(truth, p)
    metrics["ci"] = bootstrap_ci(truth, p, n_resamples=n_resamples, seed=seed) if n_resamples else None
    metrics["expected_calibration_error"] = expected_calibration_error(truth, p, n_bins)
    metrics["keras_binary_accuracy"] = binary_accuracy(truth, p)
    return metrics


def score_isic2018(frame: pd.DataFrame, probabilities: np.ndarray, n_resamples: int, seed: int) -> Optional[dict[str, Any]]:
    """The ISIC 2018 Test images scored in 2018's 7-class scheme (AKIEC = AK + SCC), with their 2018 labels."""
    rows = (frame["source"].str.contains("isic2018_test", na=False) & frame["label_2018"].notna()).to_numpy()
    if not rows.any():
        return None
    p = to_isic2018(probabilities[rows])
    # label_2018 holds the original 2018 codes (MEL, NV, BCC, AKIEC, BKL, DF, VASC)
    truth = frame.loc[rows, "label_2018"].map({code: i for i, code in enumerate(CODES_2018)}).to_numpy()
    metrics = classification_metrics(truth, p, classes=CODES_2018)
    metrics["ci"] = bootstrap_ci(truth, p, n_resamples=n_resamples, seed=seed) if n_resamples else None
    return metrics


def write_predictions(
    frame: pd.DataFrame, probabilities: np.ndarray, path: Path, truth_path: Path, columns=CODES, label: str = "label"
) -> Path:
    """The submission (exactly ``image`` + ``columns``) to ``path``, and the truth of ``frame[label]`` to ``truth_path``."""
    ids = frame["image_id"].to_numpy()
    scoring.write(scoring.ground_truth(ids, frame[label].to_numpy(), columns), truth_path, float_format=None)
    return scoring.write(scoring.submission(ids, probabilities, columns), path)


def choose_temperature(probabilities: np.ndarray, labels: pd.Series, min_images: int) -> tuple[Optional[float], str]:
    """Fit a temperature on val; return (T or None, why). None when it cannot be trusted.

    A val split the model classifies perfectly (or almost) has no finite
    optimum: T runs to the search bound and would push every probability to
    0 or 1. Such a T is not used.
    """
    if len(labels) < min_images:
        return None, f"val holds {len(labels)} images (< evaluate.min_calibration_images={min_images})"
    truth = labels.map(INDEX).to_numpy()
    if np.all(probabilities.argmax(1) == truth):
        return None, "the model gets every val image right, so no temperature can be fitted"
    fitted = fit_temperature(probabilities, truth)
    if any(np.isclose(fitted, bound, rtol=1e-3) for bound in TEMPERATURE_BOUNDS):
        return None, f"the fitted temperature {fitted:.3g} is at the search bound {TEMPERATURE_BOUNDS}"
    return fitted, f"fitted on val ({len(labels)} images)"


@dataclass
class Predicted:
    """One model's probabilities on the evaluated split (and val), and the temperatures applied to them."""

    rows: pd.DataFrame  # the split's scorable rows
    val_rows: pd.DataFrame  # val's labelled rows (empty when val is not scored)
    plain: np.ndarray  # single view, uncalibrated
    raw: np.ndarray  # with the TTA views averaged (= plain without TTA), uncalibrated
    val_plain: Optional[np.ndarray]
    temperature: Optional[float]  # fitted on val's single view (the one export builds in), or given
    headline_temperature: Optional[float]  # for ``raw``: fitted on val with the same TTA
    calibration: dict[str, Any]  # calibration.json
    fitted: bool  # a temperature was fitted (or skipped) here, so calibration.json is written

    @property
    def headline(self) -> np.ndarray:
        """The reported probabilities: TTA averaged, then calibrated."""
        return calibrated(self.raw, self.headline_temperature)


def calibrated(p: np.ndarray, temperature: Optional[float]) -> np.ndarray:
    return p if temperature is None else apply_temperature(p, temperature)


@dataclass(frozen=True)
class ReferralVal:
    """Held-out images to choose the referral threshold on, given from outside instead of the manifest's val.

    For a model whose manifest has no val split that it never trained on:
    an ensemble of k-fold members, where every image outside test trained
    some member (``dermascan.ensemble``: out-of-fold probabilities).
    """

    rows: pd.DataFrame  # labelled manifest rows
    probabilities: np.ndarray  # [N, 8]: the probabilities the threshold is chosen on, as they are
    source: str  # which probabilities these are, in words (metrics.json ``referral.chosen_on``)


def evaluate(
    model: keras.Model,
    manifest: pd.DataFrame,
    cfg: Any,
    image_size: int,
    cache: dict[str, Any],
    out_dir: Path,
    *,
    seed: int = 0,
    temperature: Optional[float] = None,
    isic2018: bool = False,
    training: Optional[dict[str, Any]] = None,
    referral_val: Optional[ReferralVal] = None,
    gate: Optional[GivenGate] = None,
) -> dict[str, Any]:
    """Evaluate ``cfg.split`` (and val), write every output into ``out_dir``; return metrics.json's content.

    With ``cfg.temperature_scaling``, a temperature is fitted on val
    (single view: the one export builds into the model, saved in
    calibration.json) unless ``temperature`` is given (the exported model
    already holds one). With TTA, the TTA probabilities get their own
    temperature, fitted on val with the same TTA. ``isic2018``: also score
    the ISIC 2018 Test images in the 2018 scheme (``data.split=official``).
    ``training``: the training's review (``fit.review_phases``), kept in
    metrics.json and shown at the top of the report. With
    ``cfg.out_of_scope.enabled``, the out-of-scope gate is fitted and
    evaluated (``evaluate_out_of_scope``) and saved as ``out_dir/out_of_scope.npz``.
    ``referral_val`` and ``gate``: the referral threshold's val images and an
    already fitted gate, for a model whose manifest holds no val split it
    never trained on (``dermascan.ensemble``); None: from the manifest's val.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predicted = predict_and_calibrate(model, manifest, cfg, image_size, cache, temperature)
    if predicted.fitted:
        (out_dir / CALIBRATION).write_text(json.dumps(predicted.calibration, indent=2))
    result = score_all(predicted, cfg, seed, isic2018, out_dir)
    result["referral"], referral_scores = score_referral(predicted, cfg, seed, referral_val)
    result["subgroups"] = score_subgroups(predicted, result["referral"], referral_scores, cfg, seed)
    result["out_of_scope"] = evaluate_out_of_scope(model, manifest, predicted.rows, cfg, image_size, cache, seed, out_dir,
                                                   given=gate)
    if training is not None:
        result["training"] = training
    write_plots(predicted, result, cfg, out_dir / PLOTS, referral_scores)
    (out_dir / METRICS).write_text(json.dumps(result, indent=2))
    (out_dir / REPORT).write_text(render_report(result))
    m = result[cfg.split]
    log.info(
        "%s split, %d images: balanced accuracy %.3f (95%% CI %s), top-1 accuracy %.3f, mean AUC %s",
        cfg.split, m["n"], m["balanced_accuracy"], _ci_text(m), m["top1_accuracy"],
        "n/a" if m["mean_auc"] is None else f"{m['mean_auc']:.3f}",
    )
    return result


def predict_and_calibrate(
    model: keras.Model, manifest: pd.DataFrame, cfg: Any, image_size: int, cache: dict[str, Any],
    temperature: Optional[float],
) -> Predicted:
    """Predict the split (and val), and fit the temperatures on val (see ``evaluate``)."""
    split, tta = cfg.split, cfg.tta
    val_rows = evaluation_rows(manifest, "val")
    val_rows = val_rows[val_rows["label"].notna()].reset_index(drop=True)
    rows = evaluation_rows(manifest, split)
    if rows["label"].notna().sum() == 0:
        raise DataError(f"the {split} split holds no images with an 8-class label to evaluate")
    plain = predict(model, rows, image_size, cfg.batch_size, cache)
    with_val = split != "val" and len(val_rows) > 0
    val_plain = plain if split == "val" else predict(model, val_rows, image_size, cfg.batch_size, cache) if with_val else None

    calibration: dict[str, Any] = {"temperature": temperature, "fitted_on": "given" if temperature else None}
    fit = cfg.temperature_scaling and temperature is None and val_plain is not None
    if fit:
        temperature, why = choose_temperature(val_plain, val_rows["label"], cfg.min_calibration_images)
        calibration = {"temperature": temperature, "fitted_on" if temperature else "skipped": why}
        if temperature is None:
            log.warning("temperature scaling not applied: %s", why)
        else:
            log.info("temperature %.3f %s", temperature, why)

    raw = plain if tta == "none" else predict(model, rows, image_size, cfg.batch_size, cache, tta)
    headline_temperature = temperature
    if tta != "none" and fit and temperature is not None:
        val_tta = predict(model, val_rows, image_size, cfg.batch_size, cache, tta)
        headline_temperature, _ = choose_temperature(val_tta, val_rows["label"], cfg.min_calibration_images)
        calibration[f"temperature_tta_{tta}"] = headline_temperature
    return Predicted(rows, val_rows if with_val else val_rows.iloc[:0], plain, raw, val_plain, temperature,
                     headline_temperature, calibration, fitted=bool(fit))


def score_all(predicted: Predicted, cfg: Any, seed: int, isic2018: bool, out_dir: Path) -> dict[str, Any]:
    """metrics.json's scores (the split, without TTA, val, the 2018 scheme); writes the predictions files."""
    split, rows, headline = cfg.split, predicted.rows, predicted.headline
    result: dict[str, Any] = {
        "split": split,
        "tta": cfg.tta,
        "calibration": predicted.calibration,
        split: score(rows["label"], headline, cfg.bootstrap_resamples, seed, cfg.calibration_bins),
    }
    if cfg.tta != "none":
        result[f"{split}_no_tta"] = score(
            rows["label"], calibrated(predicted.plain, predicted.temperature), cfg.bootstrap_resamples, seed,
            cfg.calibration_bins,
        )
    if len(predicted.val_rows):
        val = calibrated(predicted.val_plain, predicted.temperature)
        result["val"] = score(predicted.val_rows["label"], val, 0, seed, cfg.calibration_bins)

    write_predictions(rows, headline, out_dir / PREDICTIONS, out_dir / GROUND_TRUTH)
    in_2018 = (rows["source"].str.contains("isic2018_test", na=False) & rows["label_2018"].notna()).to_numpy()
    if isic2018 and in_2018.any():
        result["isic2018"] = score_isic2018(rows, headline, cfg.bootstrap_resamples, seed)
        write_predictions(rows[in_2018], to_isic2018(headline[in_2018]), out_dir / PREDICTIONS_2018,
                          out_dir / GROUND_TRUTH_2018, CODES_2018, "label_2018")
    return result


def probabilities_used(calibration: dict[str, Any], temperature: Optional[float]) -> str:
    """Which probabilities the referral threshold was chosen on, in words (metrics.json ``referral.chosen_on``)."""
    if temperature is not None:
        source = "from calibration.json" if calibration.get("fitted_on") == "given" else "fitted on val"
        return f"calibrated probabilities (temperature {temperature:.3f}, {source}; one view, as the exported model)"
    if calibration.get("skipped"):
        return f"uncalibrated probabilities (temperature scaling not applied: {calibration['skipped']})"
    return "the model's own probabilities (no temperature applied here: scaling off, or an exported model with its own)"


def score_referral(
    predicted: Predicted, cfg: Any, seed: int, referral_val: Optional[ReferralVal] = None
) -> tuple[dict[str, Any], Optional[np.ndarray]]:
    """metrics.json's ``referral``, and the split's referral scores (None when skipped).

    The threshold is chosen on val and the decision evaluated on the split,
    both on the probabilities the exported model returns: one view, with
    val's temperature (``Predicted.temperature``), even when the headline
    metrics use TTA. ``referral_val`` replaces val (see ``ReferralVal``).
    Skipped, with a warning and the reason, when the split is val itself or
    val has no labelled image needing referral.
    """
    codes = referral_codes(cfg.referral.classes)
    indices = class_indices(codes)
    val_rows = predicted.val_rows if referral_val is None else referral_val.rows
    if cfg.split == "val":
        why = "the evaluated split is val, where the threshold is chosen; evaluate another split (evaluate.split=test)"
    elif not len(val_rows):
        why = "no val split with labelled images to choose the threshold on"
    else:
        val_needs = needs_referral(val_rows["label"], codes)
        why = None if val_needs.any() else (
            f"none of the {len(val_needs)} val images has a referral class ({', '.join(codes)}), "
            "so no threshold can be chosen for a sensitivity")
    if why is not None:
        log.warning("referral operating point skipped: %s", why)
        return {"skipped": why}, None
    if referral_val is None:
        val_scores = referral_score(calibrated(predicted.val_plain, predicted.temperature), indices)
        used = probabilities_used(predicted.calibration, predicted.temperature)
    else:
        val_scores, used = referral_score(referral_val.probabilities, indices), referral_val.source
    scores = referral_score(calibrated(predicted.plain, predicted.temperature), indices)
    labelled = predicted.rows["label"].notna().to_numpy()
    result = operating_point(
        val_scores, val_needs, scores[labelled], needs_referral(predicted.rows.loc[labelled, "label"], codes), codes,
        cfg.referral.target_sensitivity, used, cfg.bootstrap_resamples, seed, split=cfg.split,
    )
    log.info("referral threshold %.4f (%s): %s", result["threshold"], result["chosen_on"], result["verdict"])
    return result, scores


def score_subgroups(
    predicted: Predicted, referral: dict[str, Any], referral_scores: Optional[np.ndarray], cfg: Any, seed: int
) -> dict[str, Any]:
    """metrics.json's ``subgroups``: balanced accuracy and mean AUC of the reported probabilities, and the
    referral decision at the val threshold (None when the referral was skipped), per subgroup of the split."""
    overall = (referral.get(cfg.split) or {}).get("sensitivity") or {}
    return evaluate_subgroups(
        predicted.rows, predicted.headline, referral_codes(cfg.referral.classes), referral_scores,
        referral.get("threshold"), overall.get("estimate"),
        min_images=cfg.subgroups.min_images, n_resamples=cfg.bootstrap_resamples, seed=seed, split=cfg.split,
    )


def write_plots(
    predicted: Predicted, result: dict[str, Any], cfg: Any, plot_dir: Path, referral_scores: Optional[np.ndarray] = None
) -> None:
    """ROC curves, the confusion matrix, the reliability diagram (before and after the temperature),
    the referral score's ROC with its operating point, and the subgroups."""
    rows, headline, raw = predicted.rows, predicted.headline, predicted.raw
    labelled = rows["label"].notna().to_numpy()
    truth = rows.loc[labelled, "label"].map(INDEX).to_numpy()
    metrics = result[cfg.split]
    plots.roc_curves(truth, headline[labelled], plot_dir / ROC_CURVES)
    plots.confusion_matrix_plot(np.array(metrics["confusion_matrix"]), plot_dir / CONFUSION_MATRIX)
    referral = result["referral"]
    if referral_scores is not None:
        needs = needs_referral(rows.loc[labelled, "label"], referral["classes"])
        plots.referral_roc(needs, referral_scores[labelled], referral["threshold"], plot_dir / REFERRAL_ROC,
                           target=referral["target_sensitivity"],
                           val_point=(referral["val"]["sensitivity"], referral["val"]["specificity"]))
    plots.subgroups_plot(result["subgroups"], plot_dir / SUBGROUPS_PLOT)
    bins = reliability_bins(truth, headline[labelled], cfg.calibration_bins)
    ece = metrics["expected_calibration_error"]
    if predicted.headline_temperature is None:
        plots.reliability_diagram(bins, plot_dir / RELIABILITY, ece=ece)
        return
    before = expected_calibration_error(truth, raw[labelled], cfg.calibration_bins)
    metrics["expected_calibration_error_before_temperature"] = before
    plots.reliability_diagram(
        reliability_bins(truth, raw[labelled], cfg.calibration_bins), plot_dir / RELIABILITY, ece=before,
        calibrated_bins=bins, calibrated_ece=ece,
    )


def _ci_text(metrics: dict[str, Any]) -> str:
    ci = (metrics.get("ci") or {}).get("balanced_accuracy") or {}
    return "n/a" if ci.get("low") is None else f"{ci['low']:.3f}-{ci['high']:.3f}"


def overridden(overrides: Sequence[str], group: str) -> list[str]:
    """The ``group.*`` overrides of a command line, as a dotlist."""
    return [o.lstrip("+") for o in overrides if o.lstrip("+").startswith(f"{group}.")]


def evaluate_main_task(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Re-evaluate a finished run (``run_dir``), or an exported model on a manifest (``export_dir`` + ``manifest``)."""
    if cfg.run_dir:
        run = load_run(cfg.run_dir)
        changed = OmegaConf.merge(OmegaConf.to_container(run.cfg), OmegaConf.from_dotlist(overridden(overrides, "evaluate")))
        settings = validate(changed, RunConfig).evaluate
        model, manifest, image_size, cache = run.model(), run.manifest, int(run.cfg.model.image_size), run.cache
        temperature = read_temperature(run.run_dir) if settings.temperature_scaling else None
        seed = run.cfg.seed if cfg.seed is None else cfg.seed
        isic2018 = run.cfg.data.split == SplitPolicy.official
        out_dir = Path(cfg.out_dir) if cfg.out_dir else eval_dir(run.run_dir, settings.split, settings.tta)
    elif cfg.export_dir and cfg.manifest and cfg.out_dir:
        run, settings = None, cfg.evaluate
        labels = read_labels(Path(cfg.export_dir))
        model = load_keras(Path(cfg.export_dir) / KERAS_MODEL)
        manifest, image_size = read_manifest(Path(cfg.manifest)), int(labels["input"]["size"][0])
        cache = OmegaConf.to_container(cfg.cache, resolve=True)
        cache["size"] = cache["size"] or image_size  # resize once, to the model's size, as training did
        # The exported model already applies its temperature: never fit or apply a second one.
        temperature, settings = None, OmegaConf.merge(settings, {"temperature_scaling": False})
        out_dir = Path(cfg.out_dir)
        seed, isic2018 = (42 if cfg.seed is None else cfg.seed), cfg.isic2018
        if out_dir.resolve().is_relative_to(Path(cfg.export_dir).resolve()):
            raise ConfigError(f"out_dir={out_dir} is inside export_dir: that would break the export's MANIFEST.sha256")
    else:
        raise ConfigError("give run_dir=<a training run dir>, or export_dir=..., manifest=... and out_dir=...")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = evaluate(model, manifest, settings, image_size, cache, out_dir, seed=seed, temperature=temperature,
                      isic2018=isic2018)
    if run is not None and cfg.log_to_mlflow:
        tag = f"{settings.split}_tta-{settings.tta}"
        with tracking.run(run.cfg, run.run_dir, run.run_dir.name, stage="evaluate", new=cfg.new_mlflow_run) as run_id:
            if run_id is not None:
                tracking.log_metrics(tracking.flat_metrics(result[settings.split]), prefix=f"eval_{tag}_")
                tracking.log_metrics(tracking.decision_metrics(result), prefix=f"eval_{tag}_")
                tracking.log_artifacts([out_dir], artifact_path=f"eval/{tag}")
    log.info("wrote %s", out_dir / REPORT)
    return result


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="evaluate_run")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    cli.run(lambda c: evaluate_main_task(c, overrides), cfg, EvaluateRunConfig)


if __name__ == "__main__":
    main()
