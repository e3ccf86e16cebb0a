"""Two-phase training: callbacks, schedules, class weights, resume.

Phase 1 trains the head with the backbone frozen (Adam, constant rate).
Phase 2 unfreezes the backbone, recompiles, and fine-tunes with Adam and
``CosineDecay`` over the phase's steps, with optional linear warmup. Both
phases log to one continuous epoch axis. Early stopping and the best
checkpoint watch ``train.monitor`` (default ``val_balanced_accuracy``,
computed in Keras' own validation pass by ``BalancedAccuracy``).

Resume: each phase runs under ``BackupAndRestore``; a finished phase leaves
its weights and a line in ``state.json``. Starting again with the same run
directory skips what is done and continues mid-phase at the next epoch.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import keras
import pandas as pd
import tensorflow as tf

from dermascan.classes import CODES
from dermascan.model import freeze_head_bn, unfreeze

log = logging.getLogger(__name__)

STATE = "state.json"
HISTORY = "history.csv"
BEST = "checkpoints/best.keras"


@keras.saving.register_keras_serializable(package="dermascan")
class BalancedAccuracy(keras.metrics.Metric):
    """Mean per-class recall of the argmax prediction (the official ISIC metric).

    Accumulates a confusion matrix; classes absent from the truth are left
    out of the mean, as in scikit-learn's ``balanced_accuracy_score``.
    Sample weights (class weights) are ignored: the metric is balanced by
    construction.
    """

    def __init__(self, num_classes: int = len(CODES), name: str = "balanced_accuracy", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.matrix = self.add_variable(
            shape=(num_classes, num_classes), initializer="zeros", dtype="float32", name="confusion"
        )

    def update_state(self, y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: Optional[tf.Tensor] = None) -> None:
        truth = tf.argmax(y_true, axis=-1)
        predicted = tf.argmax(y_pred, axis=-1)
        self.matrix.assign_add(
            tf.math.confusion_matrix(truth, predicted, num_classes=self.num_classes, dtype=tf.float32)
        )

    def result(self) -> tf.Tensor:
        support = tf.reduce_sum(self.matrix, axis=1)
        present = support > 0
        recall = tf.math.divide_no_nan(tf.linalg.diag_part(self.matrix), support)
        return tf.math.divide_no_nan(
            tf.reduce_sum(tf.where(present, recall, 0.0)), tf.reduce_sum(tf.cast(present, tf.float32))
        )

    def reset_state(self) -> None:
        self.matrix.assign(tf.zeros_like(self.matrix))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_classes": self.num_classes}


@keras.saving.register_keras_serializable(package="dermascan")
class LargestClassShare(keras.metrics.Metric):
    """The share of the predictions (argmax) that fall on the most predicted class.

    1.0 means every image gets the same class: the signature of a collapsed
    model, which ``review_phases`` looks for in ``val_largest_class_share``.
    """

    def __init__(self, num_classes: int = len(CODES), name: str = "largest_class_share", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.counts = self.add_variable(shape=(num_classes,), initializer="zeros", dtype="float32", name="counts")

    def update_state(self, y_true: tf.Tensor, y_pred: tf.Tensor, sample_weight: Optional[tf.Tensor] = None) -> None:
        # A sum of one-hot rows, not tf.math.bincount: bincount has no deterministic GPU kernel.
        predicted = tf.one_hot(tf.argmax(y_pred, axis=-1), self.num_classes, dtype=tf.float32)
        self.counts.assign_add(tf.reduce_sum(predicted, axis=0))

    def result(self) -> tf.Tensor:
        return tf.math.divide_no_nan(tf.reduce_max(self.counts), tf.reduce_sum(self.counts))

    def reset_state(self) -> None:
        self.counts.assign(tf.zeros_like(self.counts))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_classes": self.num_classes}


def compile_model(
    model: keras.Model, learning_rate: Any, label_smoothing: float, jit_compile: Any, clipnorm: Optional[float] = None
) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate, clipnorm=clipnorm),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="top1_accuracy"), BalancedAccuracy(), LargestClassShare()],
        jit_compile=jit_compile,
    )


def cosine_schedule(lr: float, steps: int, warmup_steps: int, min_lr_fraction: float) -> keras.optimizers.schedules.LearningRateSchedule:
    """Cosine decay over ``steps``, after ``warmup_steps`` of linear warmup to ``lr``."""
    if warmup_steps > 0:
        return keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0,
            decay_steps=max(1, steps - warmup_steps),
            alpha=min_lr_fraction,
            warmup_target=lr,
            warmup_steps=warmup_steps,
        )
    return keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, steps), alpha=min_lr_fraction)


def read_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    tmp = run_dir / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(run_dir / STATE)


def read_history(run_dir: Path) -> pd.DataFrame:
    """history.csv as a frame; empty when there is none yet.

    A run stopped before its first epoch ended leaves an empty file
    (CSVLogger opens it at the start of training): that is no history, not
    an error, so such a run resumes from the start.
    """
    path = run_dir / HISTORY
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame()
    return pd.read_csv(path)


def best_so_far(run_dir: Path, monitor: str, mode: str) -> Optional[float]:
    """The best monitored value in the history written so far (for a resumed checkpoint)."""
    history = read_history(run_dir)
    if monitor not in history or history[monitor].dropna().empty:
        return None
    return float(history[monitor].max() if mode == "max" else history[monitor].min())


class PhaseLogger(keras.callbacks.Callback):
    """Adds the phase number and learning rate to each epoch's logs."""

    def __init__(self, phase: int) -> None:
        super().__init__()
        self.phase = phase

    def on_epoch_end(self, epoch: int, logs: Optional[dict[str, Any]] = None) -> None:
        if logs is None:
            return
        logs["phase"] = float(self.phase)
        optimizer = self.model.optimizer
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def run_phases(
    model: keras.Model,
    base: keras.Model,
    train_data: Any,
    val_data: Any,
    train_cfg: Any,
    run_dir: Path,
    steps_per_epoch: int,
    class_weight: Optional[dict[int, float]],
    jit_compile: Any,
    freeze_bn: bool,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
) -> dict[str, Any]:
    """Train both phases (or what is left of them) and return the run's training record."""
    state = read_state(run_dir)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(run_dir / BEST),
        monitor=train_cfg.monitor,
        mode=train_cfg.monitor_mode,
        save_best_only=True,
        initial_value_threshold=best_so_far(run_dir, train_cfg.monitor, train_cfg.monitor_mode),
    )

    def callbacks(phase: int) -> list[keras.callbacks.Callback]:
        return [
            PhaseLogger(phase),
            keras.callbacks.TerminateOnNaN(),
            keras.callbacks.BackupAndRestore(str(run_dir / "backup" / f"phase{phase}")),
            keras.callbacks.EarlyStopping(
                monitor=train_cfg.monitor,
                mode=train_cfg.monitor_mode,
                patience=train_cfg.patience,
                restore_best_weights=True,
            ),
            checkpoint,
            keras.callbacks.CSVLogger(str(run_dir / HISTORY), append=True),
            *extra_callbacks,
        ]

    def fit(phase: int, initial_epoch: int, epochs: int) -> int:
        """One phase's ``fit``; returns the epochs the phase has run in all (resumes included)."""
        model.fit(
            train_data,
            validation_data=val_data,
            initial_epoch=initial_epoch,
            epochs=initial_epoch + epochs,
            steps_per_epoch=steps_per_epoch,
            class_weight=class_weight,
            callbacks=callbacks(phase),
            verbose=train_cfg.verbose,
        )
        return _epochs_done(run_dir, phase)

    e1, e2 = train_cfg.phase1.epochs, train_cfg.phase2.epochs
    phase1_weights = run_dir / "checkpoints" / "phase1_end.weights.h5"

    if "phase1_epochs" not in state:
        done = 0
        if e1 > 0:
            log.info("phase 1: head only, backbone frozen, %d epoch(s) at lr %g", e1, train_cfg.phase1.lr)
            compile_model(model, train_cfg.phase1.lr, train_cfg.label_smoothing, jit_compile, train_cfg.clipnorm)
            done = fit(1, 0, e1)
        model.save_weights(str(phase1_weights))
        state["phase1_epochs"] = done
        write_state(run_dir, state)
    elif "phase2_epochs" not in state:
        log.info("phase 1 already done (%d epochs): loading its weights", state["phase1_epochs"])
        model.load_weights(str(phase1_weights))

    if "phase2_epochs" not in state:
        done = 0
        if e2 > 0:
            trainable = unfreeze(base, train_cfg.phase2.unfreeze_from, freeze_bn=freeze_bn)
            head_bn = train_cfg.phase2.freeze_head_bn
            if (head_bn if head_bn is not None else freeze_bn) and state["phase1_epochs"] > 0:
                log.info("phase 2: %d head BatchNorm layer(s) in inference mode", freeze_head_bn(model))
            elif head_bn:
                log.warning("phase 2: the head's BatchNorm layers keep training: phase 1 ran no epoch, so they "
                            "have no statistics worth freezing")
            steps = steps_per_epoch * e2
            warmup = steps_per_epoch * train_cfg.phase2.warmup_epochs
            schedule = cosine_schedule(train_cfg.phase2.lr, steps, warmup, train_cfg.phase2.min_lr_fraction)
            log.info(
                "phase 2: fine-tuning %d backbone layer(s), %d epoch(s), cosine decay from lr %g over %d steps "
                "(%d warmup)",
                trainable, e2, train_cfg.phase2.lr, steps, warmup,
            )
            compile_model(model, schedule, train_cfg.label_smoothing, jit_compile, train_cfg.clipnorm)
            done = fit(2, state["phase1_epochs"], e2)
        state["phase2_epochs"] = done
        write_state(run_dir, state)
    return state


def _epochs_done(run_dir: Path, phase: int) -> int:
    """Epochs this phase has run in total, across interruptions (from history.csv)."""
    frame = read_history(run_dir)
    return int((frame["phase"] == phase).sum()) if "phase" in frame else 0


def steps_for(n_images: int, global_batch: int, configured: Optional[int]) -> int:
    full = max(1, math.ceil(n_images / global_batch))
    return min(configured, full) if configured else full


def review_phases(history: pd.DataFrame, monitor: str, mode: str, collapse_share: float) -> dict[str, Any]:
    """What the epochs say about the training: the best epoch, and warnings a user must not miss.

    Two failures are named: a phase whose val predictions fall onto one
    class (``val_largest_class_share`` >= ``collapse_share``), and a phase 2
    that never beats phase 1 on the monitored metric, so that the best
    checkpoint (what is evaluated and exported) is phase 1's. Epochs are
    counted from 1, across both phases.
    """
    if history.empty or monitor not in history or history[monitor].dropna().empty:
        return {"best_epoch": None, "best_phase": None, "warnings": []}
    if "epoch" in history:  # a resumed run can log an epoch twice: the later line is the one that counts
        history = history.drop_duplicates("epoch", keep="last").reset_index(drop=True)
    values = history[monitor]
    best = values.idxmax() if mode == "max" else values.idxmin()
    review: dict[str, Any] = {
        "monitor": monitor,
        "best_epoch": int(history.loc[best, "epoch"]) + 1,
        "best_phase": int(history.loc[best, "phase"]) if "phase" in history else None,
        f"best_{monitor}": float(values[best]),
        "warnings": [],
    }
    if "phase" not in history:
        return review
    share = "val_largest_class_share"
    for phase, rows in history.groupby("phase"):
        if share in rows:
            collapsed = rows[rows[share] >= collapse_share]
            if len(collapsed):
                epochs = ", ".join(str(int(e) + 1) for e in collapsed["epoch"])
                review["warnings"].append(
                    f"phase {int(phase)} collapsed: in epoch(s) {epochs} at least {collapse_share:.0%} of the val "
                    f"predictions fell on one class (largest share {collapsed[share].max():.2f})"
                )
    phases = {int(p): rows[monitor].dropna() for p, rows in history.groupby("phase") if rows[monitor].notna().any()}
    if 1 in phases and 2 in phases:
        one, two = (phases[1].max(), phases[2].max()) if mode == "max" else (phases[1].min(), phases[2].min())
        if not (two > one if mode == "max" else two < one):
            review["warnings"].append(
                f"phase 2 never beat phase 1 ({monitor}: best {two:.3f} in phase 2 against {one:.3f} in phase 1); "
                f"the exported model is phase {review['best_phase']}'s (epoch {review['best_epoch']})"
            )
    return review
