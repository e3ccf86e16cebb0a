from __future__ import annotations

import pytest

from dermascan import classes


def test_eight_classes_in_one_fixed_order():
    assert classes.CODES == ("AK", "BCC", "BKL", "DF", "MEL", "NV", "SCC", "VASC")
    assert [classes.index_of(c) for c in classes.CODES] == list(range(8))
    assert set(classes.ISIC2019_COLUMNS) - {"UNK"} == set(classes.CODES)


def test_categories_and_descriptions():
    cat = {c.code: c.category.value for c in classes.CLASSES}
    assert cat == {
        "AK": "pre-malignant", "BCC": "malignant", "BKL": "benign", "DF": "benign",
        "MEL": "malignant", "NV": "benign", "SCC": "malignant", "VASC": "benign",
    }
    assert all(len(c.description) > 20 and c.name for c in classes.CLASSES)


def test_2018_map_leaves_akiec_ambiguous():
    assert "AKIEC" not in classes.LABEL_MAP_2018_TO_2019
    assert classes.AMBIGUOUS_2018["AKIEC"] == ("AK", "SCC")
    assert set(classes.LABEL_MAP_2018_TO_2019) | {"AKIEC"} == set(classes.ISIC2018_COLUMNS)
    with pytest.raises(ValueError, match="unknown class code 'AKIEC'"):
        classes.index_of("AKIEC")
