"""Every file of a run dir and of an export dir, by name, with its reader. No TensorFlow.

A training run dir (``python -m dermascan.train``)::

    config.yaml                the validated config (rundir.load_run reads it back through config.validate)
    manifest.csv               the ingested images and their split; manifest_summary.json: counts
    class_weights.json         the weights train used, per class
    state.json, history.csv    the phases done, and one row per epoch (both phases)
    checkpoints/best.keras     the best epoch across phases: what is evaluated and exported
    checkpoints/phase1_end.weights.h5, backup/   resume points
    predictions.csv            exactly the ISIC submission layout: image, then one column per class
    ground_truth.csv           the truth of its labelled images, in the official ISIC ground-truth layout (one-hot)
    predictions_isic2018.csv   the 2018 7-class scheme (data.split=official only), and ground_truth_isic2018.csv
    metrics.json, report.md, calibration.json, summary.json
    out_of_scope.npz           the out-of-scope gate evaluation fitted (modeling.ood.load_gate reads it; export builds it in)
    out_of_scope_scores.csv    the gate's score of every image it was evaluated on: set, image, score, rejected
    plots/                     roc_curves.png, confusion_matrix.png, reliability.png, training_curves.png,
                               referral_roc.png, subgroups.png, out_of_scope.png
    eval/<split>_tta-<tta>/    re-evaluations (python -m dermascan.evaluate)
    export/                    the export dir
    mlflow_run_id.txt          the MLflow run the stages log to

An export dir (``python -m dermascan.export``)::

    model.keras, saved_model/, model_<kind>.tflite, model.mlpackage
    labels.json                what an app needs: class order, input contract, temperature
    parity.json                each format against Keras on real images
    model_card.md
    MANIFEST.sha256            sha256sum -c format, over every other file
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from dermascan.errors import DermascanError

if TYPE_CHECKING:
    import pandas as pd

# --- run dir ---
CONFIG = "config.yaml"
MANIFEST = "manifest.csv"
MANIFEST_SUMMARY = "manifest_summary.json"
CLASS_WEIGHTS = "class_weights.json"
STATE = "state.json"
HISTORY = "history.csv"
CHECKPOINTS = "checkpoints"
BEST = f"{CHECKPOINTS}/best.keras"
PHASE1_WEIGHTS = f"{CHECKPOINTS}/phase1_end.weights.h5"
BACKUP = "backup"
PREDICTIONS = "predictions.csv"
PREDICTIONS_2018 = "predictions_isic2018.csv"
GROUND_TRUTH = "ground_truth.csv"
GROUND_TRUTH_2018 = "ground_truth_isic2018.csv"
METRICS = "metrics.json"
REPORT = "report.md"
CALIBRATION = "calibration.json"
SUMMARY = "summary.json"
PLOTS = "plots"
ROC_CURVES = "roc_curves.png"
CONFUSION_MATRIX = "confusion_matrix.png"
RELIABILITY = "reliability.png"
TRAINING_CURVES = "training_curves.png"
REFERRAL_ROC = "referral_roc.png"
SUBGROUPS_PLOT = "subgroups.png"
OUT_OF_SCOPE = "out_of_scope.npz"
OUT_OF_SCOPE_SCORES = "out_of_scope_scores.csv"
OUT_OF_SCOPE_PLOT = "out_of_scope.png"
EVAL = "eval"
EXPORT = "export"
MLFLOW_RUN_ID = "mlflow_run_id.txt"

# --- export dir ---
KERAS_MODEL = "model.keras"
SAVED_MODEL = "saved_model"
COREML = "model.mlpackage"
LABELS = "labels.json"
PARITY = "parity.json"
CARD = "model_card.md"
CHECKSUMS = "MANIFEST.sha256"


def tflite_name(kind: str) -> str:
    return f"model_{kind}.tflite"


def eval_dir(run_dir: Path, split: str, tta: str) -> Path:
    """Where ``python -m dermascan.evaluate`` writes a re-evaluation of a run."""
    return Path(run_dir) / EVAL / f"{split}_tta-{tta}"


class ArtifactError(DermascanError):
    """An expected file of a run dir or export dir is missing."""


# --- readers ---


def read_json(path: Path, default: Any = None) -> Any:
    """A JSON file, or ``default`` when there is none."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else default


def read_temperature(run_dir: Path) -> Optional[float]:
    """The temperature evaluation fitted on val (``calibration.json``); None when none was fitted."""
    calibration = read_json(Path(run_dir) / CALIBRATION, {})
    return calibration.get("temperature")


def read_state(run_dir: Path) -> dict[str, Any]:
    return read_json(Path(run_dir) / STATE, {})


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    """``state.json``, replaced atomically (a killed run never leaves half a file)."""
    tmp = Path(run_dir) / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(Path(run_dir) / STATE)


def read_history(run_dir: Path) -> "pd.DataFrame":
    """history.csv as a frame; empty when there is none yet.

    A run stopped before its first epoch ended leaves an empty file
    (CSVLogger opens it at the start of training): that is no history, not
    an error, so such a run resumes from the start.
    """
    import pandas as pd  # here, not at the top: the serving path reads artifacts without pandas

    path = Path(run_dir) / HISTORY
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame()
    return pd.read_csv(path)


def read_labels(export_dir: Path) -> dict:
    """``labels.json`` as a dict; ArtifactError naming the file when it is missing, not UTF-8 JSON, or not an object.

    A malformed file can still match MANIFEST.sha256 (the manifest was
    written after it), so its shape is checked here, not trusted.
    """
    path = Path(export_dir) / LABELS
    if not path.is_file():
        raise ArtifactError(f"{path} not found: is {export_dir} an export folder (python -m dermascan.export)?")
    return read_json_object(path)


def read_json_object(path: Path) -> dict:
    """A JSON object from an export file that may be malformed; ArtifactError naming the file when it is not one."""
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ArtifactError(f"{path} is not UTF-8 text: {err}") from None
    except ValueError as err:  # json.JSONDecodeError
        raise ArtifactError(f"{path} is not valid JSON: {err}") from None
    except OSError as err:
        raise ArtifactError(f"{path} cannot be read: {err}") from None
    if not isinstance(value, dict):
        raise ArtifactError(f"{path} must hold a JSON object, got a JSON {type(value).__name__}")
    return value
