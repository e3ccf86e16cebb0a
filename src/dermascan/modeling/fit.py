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

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import keras
import pandas as pd
import tensorflow as tf

from dermascan.artifacts import (
    BACKUP,
    BEST,
    CHECKPOINTS,
    HISTORY,
    PHASE1_WEIGHTS,
    read_history,
    read_state,
    write_state,
)
from dermascan.classes import CODES
from dermascan.modeling.model import freeze_head_bn, unfreeze

log = logging.getLogger("dermascan.modeling.fit")



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


@keras.saving.register_keras_serializable(package="dermascan")
class LogitAdjustedCrossentropy(keras.losses.Loss):
    """Cross-entropy on the logits plus ``tau * log(prior)``: the logit-adjusted loss of Menon et al. (ICLR 2021).

    ``prior`` is the class distribution training draws (the data's, or the
    balanced sampler's). Fitting ``softmax(f + tau log prior)`` to those
    labels leaves the model's own ``softmax(f)`` as the posterior under equal
    class priors when ``tau = 1``: its argmax is the decision that maximises
    balanced accuracy, and nothing changes at inference or in an export. The
    model outputs probabilities, so the logits are ``log p`` (equal to ``f``
    up to a constant per image, which softmax ignores).
    """

    def __init__(self, prior: Sequence[float], tau: float = 1.0, label_smoothing: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prior = [float(p) for p in prior]
        self.tau = float(tau)
        self.label_smoothing = float(label_smoothing)
        self._shift = tf.constant([self.tau * math.log(max(p, 1e-12)) for p in self.prior], tf.float32)
        self._crossentropy = keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=label_smoothing, reduction=None
        )

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        logits = tf.math.log(tf.clip_by_value(tf.cast(y_pred, tf.float32), 1e-7, 1.0)) + self._shift
        return self._crossentropy(y_true, logits)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(), "prior": self.prior, "tau": self.tau, "label_smoothing": self.label_smoothing,
        }


def make_loss(train_cfg: Any, prior: Optional[Sequence[float]]) -> keras.losses.Loss:
    """The run's loss: plain cross-entropy, or logit-adjusted by the training prior (``train.logit_adjustment``)."""
    tau = float(train_cfg.logit_adjustment)
    if tau == 0.0:
        return keras.losses.CategoricalCrossentropy(label_smoothing=train_cfg.label_smoothing)
    if prior is None:
        raise ValueError("train.logit_adjustment needs the training class prior (FitInputs.prior)")
    return LogitAdjustedCrossentropy(prior, tau=tau, label_smoothing=train_cfg.label_smoothing)


def load_keras(path: Path, compile: bool = True) -> keras.Model:
    """A ``.keras`` file of this project: a checkpoint (``checkpoints/best.keras``) or an export's ``model.keras``.

    Loading one needs the project's layers (ShadesOfGray, IDGAugmentation)
    and metrics registered with Keras; importing this module does both.
    """
    return keras.models.load_model(path, compile=compile)


def compile_model(
    model: keras.Model,
    learning_rate: Any,
    train_cfg: Any,
    jit_compile: Any,
    ema: Optional[float] = None,
    prior: Optional[Sequence[float]] = None,
) -> None:
    """Adam with the run's clipping and weight decay, and the run's metrics.

    ``ema``: keep an exponential moving average of the weights in the
    optimizer (Keras' ``use_ema``); ``run_phases`` swaps it in for validation
    and checkpoints with ``keras.callbacks.SwapEMAWeights``. ``prior``: the
    class distribution training draws, for ``train.logit_adjustment``.
    """
    model.compile(
        optimizer=keras.optimizers.Adam(
            learning_rate,
            clipnorm=train_cfg.clipnorm,
            weight_decay=train_cfg.weight_decay or None,
            use_ema=ema is not None,
            ema_momentum=0.99 if ema is None else ema,
        ),
        loss=make_loss(train_cfg, prior),
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


@dataclass(frozen=True)
class FitInputs:
    """What both phases fit on: the train and val pipelines, the epoch length, and Keras' class weights."""

    train: Any  # tf.data.Dataset of (images, one-hot labels)
    val: Any
    steps_per_epoch: int
    class_weight: Optional[dict[int, float]] = None
    prior: Optional[tuple[float, ...]] = None  # the class distribution the train pipeline draws


@dataclass(frozen=True)
class Fitting:
    """One run's fit: the model, its backbone, the data, the train config section and where it writes."""

    model: keras.Model
    base: keras.Model
    inputs: FitInputs
    train_cfg: Any  # the validated train group
    run_dir: Path
    jit_compile: bool
    freeze_bn: bool  # the backbone's BatchNorm in inference mode (model.freeze_bn, resolved)
    callbacks: Sequence[keras.callbacks.Callback] = ()

    def callbacks_for(self, phase: int, checkpoint: keras.callbacks.ModelCheckpoint) -> list[keras.callbacks.Callback]:
        cfg = self.train_cfg
        return [
            PhaseLogger(phase),
            keras.callbacks.TerminateOnNaN(),
            keras.callbacks.BackupAndRestore(str(self.run_dir / BACKUP / f"phase{phase}")),
            # After the backup (which must hold the raw weights and their average
            # unswapped), before what reads the epoch's weights: early stopping,
            # the checkpoint.
            *([keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if phase == 2 and cfg.ema_momentum is not None else []),
            keras.callbacks.EarlyStopping(
                monitor=cfg.monitor, mode=cfg.monitor_mode, patience=cfg.patience, restore_best_weights=True
            ),
            checkpoint,
            keras.callbacks.CSVLogger(str(self.run_dir / HISTORY), append=True),
            *self.callbacks,
        ]

    def fit(self, phase: int, initial_epoch: int, epochs: int, checkpoint: keras.callbacks.ModelCheckpoint) -> int:
        """One phase's ``fit``; returns the epochs the phase has run in all (resumes included)."""
        # BackupAndRestore resumes by setting model._initial_epoch, which Keras
        # (3.15) never clears and fit prefers to its own initial_epoch: a run
        # resumed inside phase 1 would start phase 2 at phase 1's resumed epoch.
        self.model._initial_epoch = None
        self.model.fit(
            self.inputs.train,
            validation_data=self.inputs.val,
            initial_epoch=initial_epoch,
            epochs=initial_epoch + epochs,
            steps_per_epoch=self.inputs.steps_per_epoch,
            class_weight=self.inputs.class_weight,
            callbacks=self.callbacks_for(phase, checkpoint),
            verbose=self.train_cfg.verbose,
        )
        return _epochs_done(self.run_dir, phase)


def run_phases(fitting: Fitting) -> dict[str, Any]:
    """Train both phases (or what is left of them) and return the run's training record (``state.json``).

    The best epoch of either phase is checkpointed to ``checkpoints/best.keras``
    (one ModelCheckpoint across both phases), and an interrupted run resumes
    where it stopped.
    """
    run_dir, cfg = fitting.run_dir, fitting.train_cfg
    state = read_state(run_dir)
    (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(run_dir / BEST),
        monitor=cfg.monitor,
        mode=cfg.monitor_mode,
        save_best_only=True,
        initial_value_threshold=best_so_far(run_dir, cfg.monitor, cfg.monitor_mode),
    )
    if "phase1_epochs" not in state:
        state["phase1_epochs"] = _phase1(fitting, checkpoint)
        write_state(run_dir, state)
    elif "phase2_epochs" not in state:
        log.info("phase 1 already done (%d epochs): loading its weights", state["phase1_epochs"])
        fitting.model.load_weights(str(run_dir / PHASE1_WEIGHTS))
    if "phase2_epochs" not in state:
        state["phase2_epochs"] = _phase2(fitting, checkpoint, phase1_epochs=state["phase1_epochs"])
        write_state(run_dir, state)
    return state


def _phase1(fitting: Fitting, checkpoint: keras.callbacks.ModelCheckpoint) -> int:
    """The head on the frozen backbone, at a constant rate; its end weights are kept for a resume."""
    cfg, done = fitting.train_cfg, 0
    if cfg.phase1.epochs > 0:
        log.info("phase 1: head only, backbone frozen, %d epoch(s) at lr %g", cfg.phase1.epochs, cfg.phase1.lr)
        compile_model(fitting.model, cfg.phase1.lr, cfg, fitting.jit_compile, prior=fitting.inputs.prior)
        done = fitting.fit(1, 0, cfg.phase1.epochs, checkpoint)
    fitting.model.save_weights(str(fitting.run_dir / PHASE1_WEIGHTS))
    return done


def _phase2(fitting: Fitting, checkpoint: keras.callbacks.ModelCheckpoint, phase1_epochs: int) -> int:
    """The backbone unfrozen (all of it, or from unfreeze_from) and everything fine-tuned with cosine decay."""
    cfg = fitting.train_cfg
    epochs = cfg.phase2.epochs
    if epochs == 0:
        return 0
    trainable = unfreeze(fitting.base, cfg.phase2.unfreeze_from, freeze_bn=fitting.freeze_bn)
    head_bn = cfg.phase2.freeze_head_bn
    if (head_bn if head_bn is not None else fitting.freeze_bn) and phase1_epochs > 0:
        log.info("phase 2: %d head BatchNorm layer(s) in inference mode", freeze_head_bn(fitting.model))
    elif head_bn:
        log.warning("phase 2: the head's BatchNorm layers keep training: phase 1 ran no epoch, so they "
                    "have no statistics worth freezing")
    steps = fitting.inputs.steps_per_epoch * epochs
    warmup = fitting.inputs.steps_per_epoch * cfg.phase2.warmup_epochs
    schedule = cosine_schedule(cfg.phase2.lr, steps, warmup, cfg.phase2.min_lr_fraction)
    log.info(
        "phase 2: fine-tuning %d backbone layer(s), %d epoch(s), cosine decay from lr %g over %d steps (%d warmup)",
        trainable, epochs, cfg.phase2.lr, steps, warmup,
    )
    compile_model(fitting.model, schedule, cfg, fitting.jit_compile, ema=cfg.ema_momentum, prior=fitting.inputs.prior)
    return fitting.fit(2, phase1_epochs, epochs, checkpoint)


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
