"""The generated demo dataset: official layout, deterministic, varied, ingestible."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from dermascan.classes import CODES
from dermascan.config import IngestConfig
from dermascan.data import demo
from dermascan.errors import DataError
from dermascan.ingest import ingest

from .conftest import compose_config

SMALL = demo.DemoSpec(images_per_class=12, seed=3, min_side=64, max_side=160, isic2018_share=0.5)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_layout_is_official_and_deterministic(tmp_path):
    a = demo.ensure(tmp_path / "a", SMALL)
    b = demo.ensure(tmp_path / "b", SMALL)
    for name in ("ISIC_2019_Training_GroundTruth.csv", "ISIC_2019_Training_Metadata.csv",
                 "ISIC2018_Task3_Training_GroundTruth.csv"):
        assert digest(a / name) == digest(b / name)
    jpegs = sorted((a / "ISIC_2019_Training_Input").glob("ISIC_*.jpg"))
    assert len(jpegs) == 12 * 8
    assert digest(jpegs[0]) == digest(b / "ISIC_2019_Training_Input" / jpegs[0].name)
    sizes = {Image.open(p).size for p in jpegs}
    assert len(sizes) > 10 and all(64 <= min(s) and max(s) <= 240 for s in sizes)


def test_demo_is_reused_and_regenerated_when_settings_change(tmp_path):
    root = demo.ensure(tmp_path / "demo", SMALL)
    stamp = (root / "ISIC_2019_Training_GroundTruth.csv").stat().st_mtime_ns
    demo.ensure(root, SMALL)
    assert (root / "ISIC_2019_Training_GroundTruth.csv").stat().st_mtime_ns == stamp
    demo.ensure(root, demo.DemoSpec(images_per_class=5, seed=3, min_side=64, max_side=160, isic2018_share=0.5))
    assert len(list((root / "ISIC_2019_Training_Input").glob("*.jpg"))) == 40


def test_demo_refuses_to_overwrite_other_data(tmp_path):
    (tmp_path / "precious.txt").write_text("not a demo")
    with pytest.raises(DataError, match="refusing to overwrite"):
        demo.ensure(tmp_path, SMALL)
    assert (tmp_path / "precious.txt").read_text() == "not a demo"


def test_classes_differ_visually():
    """Mean lesion colour alone separates most class pairs, so a small net learns them fast."""
    rng = np.random.default_rng(0)
    means = {
        code: np.mean([np.asarray(demo.render(code, rng, 96, 96), float)[32:64, 32:64].mean((0, 1))
                       for _ in range(8)], axis=0)
        for code in CODES
    }
    distances = [np.linalg.norm(means[a] - means[b]) for i, a in enumerate(CODES) for b in CODES[i + 1:]]
    assert min(distances) > 10


def test_demo_ingests_with_every_class_in_every_split(tmp_path):
    cfg = compose_config(
        "ingest",
        [f"data.root={tmp_path / 'raw'}", f"data.processed_dir={tmp_path / 'out'}",
         "data.demo.images_per_class=20", "data.demo.max_side=200"],
        IngestConfig,
    )
    result = ingest(cfg)
    manifest = result.manifest
    assert len(manifest) == 160 + 6  # 6 ISIC 2018-only images; the 2 AKIEC ones are dropped
    assert (manifest.groupby(["split", "label"]).size() > 0).sum() == 24
    assert (manifest.groupby("lesion_id")["split"].nunique() == 1).all()
    excluded = result.summary["excluded"]["by_reason"]
    assert list(excluded) == ["ambiguous AKIEC (AK or SCC) not relabelled by ISIC 2019 (data.akiec=drop)"]
    assert excluded[list(excluded)[0]]["count"] == 2
    assert result.summary["duplicates_merged"]["images_in_several_releases"] > 0


def test_demo_metadata_gives_every_subgroup_offline(tmp_path):
    """Age, sex and site as ISIC writes them, so the subgroup metrics run on the demo too."""
    from dermascan.evaluation.subgroups import assign

    cfg = compose_config(
        "ingest",
        [f"data.root={tmp_path / 'raw'}", f"data.processed_dir={tmp_path / 'out'}", "data.demo.images_per_class=20",
         "data.demo.min_side=48", "data.demo.max_side=64"],
        IngestConfig,
    )
    manifest = ingest(cfg).manifest
    in_2019 = manifest["source"].str.contains("isic2019_train")
    known = manifest[in_2019]
    assert known[["age", "sex", "site"]].notna().all().all()  # every ISIC 2019 demo image has its metadata
    assert known["age"].between(20, 80).all() and (known["age"] % 5 == 0).all()  # age_approx: multiples of 5
    assert set(known["sex"]) == {"male", "female"} and set(known["site"]) == set(demo.SITES)
    assert manifest.loc[~in_2019, ["age", "sex", "site"]].isna().all().all()  # 2018-only: no metadata, as in ISIC
    groups = assign(manifest)
    assert {"<30", "30–49", "50–69", "≥70"} <= set(groups["age_band"])
    assert set(groups["collection"]) == {"HAM10000", "other"}  # the 2018 share is HAM10000 by its source
