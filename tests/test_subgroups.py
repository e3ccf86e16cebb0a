"""dermascan.evaluation.subgroups: the groups on the real ISIC 2019 metadata, the per-group metrics and flags."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from dermascan.classes import CODES, INDEX
from dermascan.data.isic import METADATA_2019, read_metadata
from dermascan.evaluation import subgroups
from dermascan.evaluation.metrics import classification_metrics
from dermascan.evaluation.subgroups import (
    age_band,
    assign,
    collection,
    evaluate_subgroups,
    metric_name,
)


@pytest.mark.parametrize(
    "age, band",
    [(0, "<30"), (25, "<30"), (29.9, "<30"), (30, "30–49"), (45, "30–49"), (49, "30–49"), (50, "50–69"),
     (65, "50–69"), (70, "≥70"), (85, "≥70"), (None, "unknown"), (float("nan"), "unknown"), ("", "unknown"),
     (-5, "unknown"), ("55", "50–69")],
)
def test_age_band(age, band):
    assert age_band(age) == band


@pytest.mark.parametrize(
    "image_id, lesion_id, source, expected",
    [
        ("ISIC_0024306", "HAM_0000118", "isic2018_train+isic2019_train", "HAM10000"),
        ("ISIC_0024306", None, "isic2018_train", "HAM10000"),  # the 2018 training set is HAM10000
        ("ISIC_0053454", "BCN_0000001", "isic2019_train", "BCN_20000"),
        ("ISIC_0012653_downsampled", "MSK4_0011169", "isic2019_train", "MSK"),
        ("ISIC_0012758", "MSK4_0011300", "isic2019_train", "MSK"),
        ("ISIC_0000017_downsampled", None, "isic2019_train", "MSK"),
        ("ISIC_0000000", None, "isic2019_train", "other"),
        ("ISIC_0034524", None, "isic2018_test", "other"),
        ("ISIC_9000000", "IL_0000001", "isic2019_train", "other"),  # the demo's
    ],
)
def test_collection_rule(image_id, lesion_id, source, expected):
    assert collection(image_id, lesion_id, source) == expected


def test_real_isic2019_metadata_splits_into_the_official_counts(isic_csvs, tmp_path):
    """The groups ingestion's metadata gets, counted independently from the official CSV with pandas."""
    shutil.copyfile(isic_csvs / METADATA_2019, tmp_path / METADATA_2019)  # the 2019 file alone, as ingested
    meta = read_metadata(tmp_path).assign(source="isic2019_train")
    groups = assign(meta)
    official = pd.read_csv(isic_csvs / METADATA_2019)
    assert len(groups) == len(official) == 25_331

    age = official["age_approx"]
    expected_ages = {
        "<30": int((age < 30).sum()), "30–49": int(((age >= 30) & (age < 50)).sum()),
        "50–69": int(((age >= 50) & (age < 70)).sum()), "≥70": int((age >= 70).sum()), "unknown": int(age.isna().sum()),
    }
    assert groups["age_band"].value_counts().to_dict() == expected_ages
    assert sum(expected_ages.values()) == 25_331 and expected_ages["unknown"] == 437

    sites = official["anatom_site_general"].fillna("unknown").value_counts().to_dict()
    assert groups["site"].value_counts().to_dict() == sites
    assert sites["anterior torso"] == 6_915 and sites["unknown"] == 2_631 and sites["palms/soles"] == 398

    assert groups["sex"].value_counts().to_dict() == official["sex"].fillna("unknown").value_counts().to_dict()

    lesion = official["lesion_id"].fillna("")
    msk = lesion.str.startswith("MSK") | official["image"].str.endswith("_downsampled")
    expected_collections = {
        "HAM10000": int(lesion.str.startswith("HAM_").sum()),
        "BCN_20000": int(lesion.str.startswith("BCN_").sum()),
        "MSK": int(msk.sum()),
    }
    expected_collections["other"] = 25_331 - sum(expected_collections.values())
    assert groups["collection"].value_counts().to_dict() == expected_collections
    # HAM10000 and BCN_20000 as published; MSK: 819 MSK lesion ids and 1,258 more downsampled images
    assert expected_collections == {"HAM10000": 10_015, "BCN_20000": 12_413, "MSK": 2_077, "other": 826}


def test_missing_columns_and_blank_values_are_unknown():
    frame = pd.DataFrame({"image_id": ["a", "b"], "site": ["", None], "age": [np.nan, "x"]})
    groups = assign(frame)
    assert groups.to_dict("list") == {
        "age_band": ["unknown"] * 2, "sex": ["unknown"] * 2, "site": ["unknown"] * 2, "collection": ["other"] * 2,
    }


def hand_frame() -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Men: 20 MEL, 2 of them referred, and 5 NV; women: 20 MEL, all referred, and 15 NV. One unlabelled image."""
    rows, scores = [], []
    for sex, mel_referred, n_nv in (("male", 2, 5), ("female", 20, 15)):
        for i in range(20):
            rows.append(("MEL", sex, "head/neck" if i % 2 else None))
            scores.append(0.9 if i < mel_referred else 0.1)
        for i in range(n_nv):
            rows.append(("NV", sex, "head/neck"))
            scores.append(0.2 if i % 3 else 0.6)
    rows.append((None, "female", "head/neck"))
    scores.append(0.9)
    frame = pd.DataFrame(rows, columns=["label", "sex", "site"])
    frame["image_id"] = [f"ISIC_{i:07d}" for i in range(len(frame))]
    frame["age"], frame["lesion_id"], frame["source"] = 40.0, None, "isic2019_train"
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(8), len(frame))
    return frame, probabilities, np.array(scores)


def test_subgroup_metrics_and_flags_by_hand():
    frame, probabilities, scores = hand_frame()
    result = evaluate_subgroups(frame, probabilities, ["MEL"], scores, threshold=0.5, overall_sensitivity=22 / 40,
                                min_images=30, n_resamples=500, seed=0)
    assert result["n"] == 60 and result["referral_threshold"] == 0.5 and result["min_images"] == 30
    assert list(result["dimensions"]) == ["age_band", "sex", "site", "collection"]
    sex = result["dimensions"]["sex"]
    assert list(sex) == ["female", "male"]  # largest first
    male, female = sex["male"], sex["female"]
    assert (male["n"], male["n_positive"], female["n"], female["n_positive"]) == (25, 20, 35, 20)
    assert male["referral_sensitivity"]["estimate"] == pytest.approx(0.1)
    assert female["referral_sensitivity"]["estimate"] == 1.0
    # NV referred when the score is 0.6: male NV 0, 3 -> 2 of 5 referred; female 0, 3, 6, 9, 12 -> 5 of 15
    assert male["referral_specificity"]["estimate"] == pytest.approx(3 / 5)
    assert female["referral_specificity"]["estimate"] == pytest.approx(10 / 15)
    # men: 2 of 20 referred, CI far below the overall 0.55; and under 30 images
    assert male["referral_sensitivity"]["high"] < 22 / 40
    assert male["flags"] == ["small", "below overall"] and female["flags"] == []

    rows = (frame["sex"] == "male").to_numpy() & frame["label"].notna().to_numpy()
    expected = classification_metrics(frame.loc[rows, "label"].map(INDEX).to_numpy(), probabilities[rows])
    assert male["balanced_accuracy"]["estimate"] == pytest.approx(expected["balanced_accuracy"])
    assert male["mean_auc"]["estimate"] == pytest.approx(expected["mean_auc"])
    assert male["n_classes"] == 2 and male["n_auc_classes"] == 2  # MEL and NV, each with positives and negatives
    assert male["balanced_accuracy"]["low"] <= male["balanced_accuracy"]["estimate"] <= male["balanced_accuracy"]["high"]

    site = result["dimensions"]["site"]
    assert list(site) == ["head/neck", "unknown"] and site["unknown"]["n"] == 20  # the odd MEL rows lack a site
    assert site["unknown"]["n_auc_classes"] == 0 and site["unknown"]["mean_auc"]["estimate"] is None  # MEL only
    assert list(result["dimensions"]["age_band"]) == ["30–49"]
    # nothing dropped: each dimension's groups add up to the labelled images
    for groups in result["dimensions"].values():
        assert sum(g["n"] for g in groups.values()) == 60


def test_subgroups_without_a_referral_threshold():
    frame, probabilities, _ = hand_frame()
    result = evaluate_subgroups(frame, probabilities, ["MEL"], min_images=30, n_resamples=0, seed=0)
    male = result["dimensions"]["sex"]["male"]
    assert male["referral_sensitivity"] is None and male["referral_specificity"] is None
    assert male["balanced_accuracy"]["low"] is None and male["balanced_accuracy"]["estimate"] is not None
    assert male["flags"] == ["small"]
    table = subgroups.table(result)
    assert list(table.columns[:4]) == ["dimension", "group", "n", "n_positive"]
    assert len(table) == sum(len(g) for g in result["dimensions"].values())
    assert table.set_index(["dimension", "group"]).loc[("sex", "male"), "flags"] == "small"


@pytest.mark.parametrize(
    "text, name",
    [("<30", "lt30"), ("≥70", "ge70"), ("30–49", "30_49"), ("head/neck", "head_neck"),
     ("lower extremity", "lower_extremity"), ("BCN_20000", "bcn_20000"), ("age_band", "age_band"), ("", "blank")],
)
def test_metric_names_are_mlflow_safe_and_stable(text, name):
    assert metric_name(text) == name
    assert set(metric_name(text)) <= set("abcdefghijklmnopqrstuvwxyz0123456789_")


def test_every_class_code_is_a_valid_metric_name():
    assert [metric_name(c) for c in CODES] == [c.lower() for c in CODES]
