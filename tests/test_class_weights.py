"""Class weights equal scikit-learn's "balanced" weights on the real ISIC 2019 labels."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from dermascan.classes import CODES
from dermascan.data.isic import RELEASES, read_ground_truth
from dermascan.errors import ConfigError
from dermascan.modeling.class_weights import class_weights, keras_class_weight, save


@pytest.fixture(scope="module")
def isic2019_labels(isic_csvs) -> list[str]:
    rows, _ = read_ground_truth(isic_csvs, RELEASES["isic2019_train"])
    return list(rows["label"])


def test_balanced_equals_scikit_learn_on_isic2019(isic2019_labels):
    weights = class_weights(isic2019_labels, "balanced")
    expected = compute_class_weight("balanced", classes=np.array(CODES), y=np.array(isic2019_labels))
    assert list(weights) == list(CODES)
    np.testing.assert_allclose(list(weights.values()), expected, rtol=1e-12)
    # The behaviour we rely on: n_samples / (n_classes * n_c).
    assert weights["NV"] == pytest.approx(25331 / (8 * 12875))
    assert weights["DF"] == pytest.approx(25331 / (8 * 239))
    assert keras_class_weight(weights)[CODES.index("DF")] == weights["DF"]


def test_none_gives_ones_and_bad_mode_is_named(isic2019_labels):
    assert set(class_weights(isic2019_labels, "none").values()) == {1.0}
    with pytest.raises(ConfigError, match="train.class_weight"):
        class_weights(isic2019_labels, "inverse")


def test_absent_class_gets_one_and_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        weights = class_weights(["NV", "NV", "MEL"], "balanced")
    assert weights["DF"] == 1.0 and weights["MEL"] == pytest.approx(3 / (2 * 1))
    assert "DF" in caplog.text


def test_saved_with_counts(isic2019_labels, tmp_path):
    weights = class_weights(isic2019_labels)
    saved = json.loads(save(weights, isic2019_labels, tmp_path / "w.json", "balanced").read_text())
    assert saved["train_counts"]["NV"] == 12875 and saved["weights"] == weights
