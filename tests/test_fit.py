"""Phase-2 safety: the head's BatchNorm in inference mode, the collapse metric, the phase review, clipping."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest

from dermascan.config import RunConfig
from dermascan.modeling.fit import (
    LargestClassShare,
    LogitAdjustedCrossentropy,
    compile_model,
    review_phases,
)
from dermascan.modeling.model import build_model, freeze_head_bn, unfreeze

from .conftest import compose_config, model_config


def history(val: list[float], shares: list[float], phases: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"epoch": range(len(val)), "phase": phases, "val_balanced_accuracy": val,
                         "val_largest_class_share": shares})


def test_review_names_a_collapse_and_a_phase_2_that_never_beat_phase_1():
    # The run issue 11 reported: phase 1 learns, phase 2 sends every val image to one class.
    frame = history([0.47, 0.51, 0.56, 0.125, 0.125, 0.18, 0.44], [0.6, 0.55, 0.5, 1.0, 0.99, 0.9, 0.6],
                    [1, 1, 1, 2, 2, 2, 2])
    review = review_phases(frame, "val_balanced_accuracy", "max", collapse_share=0.95)
    assert review["best_epoch"] == 3 and review["best_phase"] == 1
    assert review["best_val_balanced_accuracy"] == pytest.approx(0.56)
    collapse, never = review["warnings"]
    assert collapse.startswith("phase 2 collapsed: in epoch(s) 4, 5 ") and "largest share 1.00" in collapse
    assert never == ("phase 2 never beat phase 1 (val_balanced_accuracy: best 0.440 in phase 2 against 0.560 in "
                     "phase 1); the exported model is phase 1's (epoch 3)")


def test_review_of_a_healthy_run_has_no_warning_and_a_tie_is_not_a_win():
    healthy = review_phases(history([0.5, 0.55, 0.6, 0.62], [0.6, 0.5, 0.5, 0.45], [1, 1, 2, 2]),
                            "val_balanced_accuracy", "max", 0.95)
    assert healthy["warnings"] == [] and healthy["best_epoch"] == 4 and healthy["best_phase"] == 2
    tie = review_phases(history([0.5, 0.6, 0.6], [0.5, 0.5, 0.5], [1, 1, 2]), "val_balanced_accuracy", "max", 0.95)
    assert len(tie["warnings"]) == 1 and tie["warnings"][0].startswith("phase 2 never beat phase 1")
    loss = pd.DataFrame({"epoch": [0, 1, 2], "phase": [1, 1, 2], "val_loss": [1.0, 0.8, 0.7]})
    assert review_phases(loss, "val_loss", "min", 0.95)["warnings"] == []
    assert review_phases(pd.DataFrame(), "val_loss", "min", 0.95)["warnings"] == []


def test_largest_class_share_counts_the_argmax():
    rng = np.random.default_rng(0)
    scores = rng.random((200, 8))
    scores[:120, 5] += 1.0  # at least 120 of 200 predicted NV
    metric = LargestClassShare()
    for chunk in np.array_split(np.arange(200), 3):
        metric.update_state(np.eye(8)[np.zeros(len(chunk), int)], scores[chunk])
    counts = np.bincount(scores.argmax(1), minlength=8)
    assert float(metric.result()) == pytest.approx(counts.max() / 200)
    metric.reset_state()
    metric.update_state(np.eye(8)[[0, 1]], np.eye(8)[[3, 3]])
    assert float(metric.result()) == 1.0


@pytest.mark.integration
def test_frozen_head_bn_keeps_its_statistics_while_the_backbone_fine_tunes():
    keras.utils.set_random_seed(0)
    model, base = build_model(model_config(image_size=32, weights=None, alpha=0.35, units=[8, 8], dropout=[0.0, 0.0]))
    images = np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    labels = np.eye(8)[np.arange(16) % 8]
    unfreeze(base, -10, freeze_bn=True)
    assert freeze_head_bn(model) == 2
    train_cfg = compose_config("train", ["run_dir=/tmp/x", "train.clipnorm=1.0"], RunConfig).train
    compile_model(model, 1e-2, train_cfg, False)
    head = {w.path: w.numpy() for layer in ("bn_1", "bn_2") for w in model.get_layer(layer).weights}
    kernel = base.layers[-5].get_weights()
    model.fit(images, labels, epochs=2, batch_size=8, verbose=0)
    # Inference mode: moving statistics and the affine parameters stay as phase 1 left them...
    assert all(np.array_equal(w.numpy(), head[w.path]) for layer in ("bn_1", "bn_2")
               for w in model.get_layer(layer).weights)
    # ...while the unfrozen backbone does train.
    assert any(not np.array_equal(a, b) for a, b in zip(kernel, base.layers[-5].get_weights()))
    assert model.optimizer.clipnorm == 1.0


def test_report_leads_with_the_training_warnings():
    from dermascan.evaluation.report import training_section

    review = review_phases(history([0.5, 0.56, 0.3], [0.5, 0.5, 0.97], [1, 1, 2]), "val_balanced_accuracy", "max", 0.95)
    text = "\n".join(training_section(review))
    assert text.startswith("## Training")
    assert "**Warning: phase 2 collapsed: in epoch(s) 3" in text
    assert "**Warning: phase 2 never beat phase 1" in text and "the exported model is phase 1's (epoch 2).**" in text
    assert "The evaluated model is the best checkpoint: epoch 2 (phase 1), val_balanced_accuracy 0.560." in text


def test_a_run_stopped_before_its_first_epoch_ended_resumes(tmp_path):
    """CSVLogger creates history.csv when training starts; killed before an epoch ends, it stays empty."""
    from dermascan.artifacts import read_history
    from dermascan.modeling.fit import _epochs_done, best_so_far

    (tmp_path / "history.csv").write_text("")
    assert read_history(tmp_path).empty
    assert best_so_far(tmp_path, "val_balanced_accuracy", "max") is None
    assert _epochs_done(tmp_path, 1) == 0
    history([0.4, 0.5], [0.5, 0.5], [1, 1]).to_csv(tmp_path / "history.csv", index=False)
    assert best_so_far(tmp_path, "val_balanced_accuracy", "max") == 0.5 and _epochs_done(tmp_path, 1) == 2


def test_review_counts_a_resumed_epoch_once():
    # Epoch 3 was logged, interrupted and run again: the second line is the one that counts.
    frame = history([0.5, 0.55, 0.2, 0.6], [0.5, 0.5, 1.0, 0.5], [1, 1, 2, 2])
    frame["epoch"] = [0, 1, 2, 2]
    review = review_phases(frame, "val_balanced_accuracy", "max", 0.95)
    assert review["warnings"] == [] and review["best_epoch"] == 3


def test_keras_swap_ema_weights_puts_the_average_in_the_checkpoint(tmp_path):
    """What train.ema_momentum relies on: with SwapEMAWeights(swap_on_epoch=True) before ModelCheckpoint, the
    callbacks after it (early stopping, the checkpoint) see the moving average, not the last step's weights."""

    class Weights(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[list[np.ndarray]] = []

        def on_epoch_end(self, epoch, logs=None) -> None:
            self.seen.append([w.copy() for w in self.model.get_weights()])

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(0.05, use_ema=True, ema_momentum=0.9), loss="categorical_crossentropy")
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = np.eye(3)[np.arange(64) % 3]
    raw, averaged, path = Weights(), Weights(), tmp_path / "best.keras"
    callbacks = [raw, keras.callbacks.SwapEMAWeights(swap_on_epoch=True), averaged, keras.callbacks.ModelCheckpoint(str(path))]
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=callbacks)
    saved = keras.models.load_model(path).get_weights()
    np.testing.assert_allclose(saved[0], averaged.seen[-1][0], rtol=1e-6)
    assert not np.allclose(averaged.seen[-1][0], raw.seen[-1][0], atol=1e-3)


def test_phase2_alone_averages_and_the_average_is_swapped_in_before_early_stopping_and_the_checkpoint(tmp_path):
    from dermascan.config import RunConfig
    from dermascan.modeling.fit import FitInputs, Fitting

    train_cfg = compose_config("train", ["run_dir=/tmp/x", "train.ema_momentum=0.998"], RunConfig).train
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8)])
    fitting = Fitting(model, model, FitInputs(None, None, 1), train_cfg, tmp_path, jit_compile=False, freeze_bn=True)
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"))
    for phase in (1, 2):
        kinds = [type(c).__name__ for c in fitting.callbacks_for(phase, checkpoint)]
        if phase == 1:
            assert "SwapEMAWeights" not in kinds
        else:
            swap = kinds.index("SwapEMAWeights")
            assert kinds.index("BackupAndRestore") < swap < kinds.index("EarlyStopping") < kinds.index("ModelCheckpoint")


def test_the_run_compiles_the_logit_adjusted_loss_only_when_asked():
    prior = (0.5, 0.5, 0, 0, 0, 0, 0, 0)
    for overrides, expected in (([], keras.losses.CategoricalCrossentropy), (
        ["train.logit_adjustment=0.7", "train.class_weight=none"], LogitAdjustedCrossentropy,
    )):
        train_cfg = compose_config("train", ["run_dir=/tmp/x", *overrides], RunConfig).train
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="softmax")])
        compile_model(model, 1e-3, train_cfg, False, prior=prior)
        assert type(model.loss) is expected
    assert model.loss.tau == 0.7 and model.loss.prior == list(prior)


def test_keras_crossentropy_from_logits_is_crossentropy_of_their_softmax():
    # LogitAdjustedCrossentropy relies on this: Keras' from_logits loss equals
    # the probability loss on softmax(logits), label smoothing included.
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 8)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 8, 6), 8)
    for smoothing in (0.0, 0.1):
        on_logits = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=smoothing)(y, logits)
        on_probs = keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)(y, keras.ops.softmax(logits))
        np.testing.assert_allclose(float(on_logits), float(on_probs), rtol=1e-5)


def test_logit_adjusted_loss_leaves_a_balanced_model_where_plain_crossentropy_learns_the_prior():
    # No feature tells the classes apart: the best plain cross-entropy can do is
    # predict the training prior (NV 70%); the logit-adjusted loss (tau 1)
    # leaves the model's own output at equal classes (the balanced posterior),
    # and it survives a save and load of the compiled model.
    prior = np.array([0.02, 0.05, 0.1, 0.02, 0.08, 0.7, 0.02, 0.01])
    y = keras.utils.to_categorical(np.random.default_rng(1).choice(8, size=4000, p=prior), 8)
    x = np.ones((len(y), 1), "float32")

    def fitted(loss: keras.losses.Loss) -> tuple[np.ndarray, keras.Model]:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(8, activation="softmax")])
        model.compile(keras.optimizers.Adam(0.05), loss=loss)
        model.fit(x, y, batch_size=200, epochs=30, verbose=0)
        return model.predict(x[:1], verbose=0)[0], model

    seen = y.mean(axis=0)
    plain, _ = fitted(keras.losses.CategoricalCrossentropy())
    np.testing.assert_allclose(plain, seen, atol=0.02)
    adjusted, model = fitted(LogitAdjustedCrossentropy(seen, tau=1.0))
    np.testing.assert_allclose(adjusted, 1 / 8, atol=0.02)
    half, _ = fitted(LogitAdjustedCrossentropy(seen, tau=0.5))  # half way: ∝ sqrt(prior)
    np.testing.assert_allclose(half, np.sqrt(seen) / np.sqrt(seen).sum(), atol=0.02)

    no_adjustment = LogitAdjustedCrossentropy(seen, tau=0.0, label_smoothing=0.1)
    np.testing.assert_allclose(
        float(no_adjustment(y[:50], plain[None].repeat(50, 0))),
        float(keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(y[:50], plain[None].repeat(50, 0))),
        rtol=1e-5,
    )
    restored = LogitAdjustedCrossentropy.from_config(model.loss.get_config())
    assert restored.prior == pytest.approx(list(seen)) and restored.tau == 1.0
