"""A generated demo dataset in the official ISIC layout.

The demo lets the whole pipeline run offline in minutes. It is written from
a seed, in the same files as the real downloads, and exercises the same
paths: the ISIC 2019 CSVs and JPEGs; an ISIC 2018 training file that repeats
part of the 2019 images (as HAM10000 does) with AK and SCC folded into
AKIEC; a few ISIC 2018-only images, AKIEC among them; lesions photographed
more than once; images without a lesion id; and varied image sizes.

Each class has its own look (colour, texture, structure), loosely after its
dermoscopic pattern, so that a small network learns them in a few epochs.
Nothing here is medical data.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from dermascan.classes import CODES, ISIC2018_COLUMNS, ISIC2019_COLUMNS
from dermascan.data.isic import METADATA_2019, RELEASES
from dermascan.errors import DataError

log = logging.getLogger("dermascan.data.demo")

MARKER = ".dermascan_demo.json"
FIRST_ID = 9_000_000
SITES = ("anterior torso", "posterior torso", "lower extremity", "upper extremity", "head/neck")


@dataclass(frozen=True)
class DemoSpec:
    # data.demo's keys (configs/data/demo.yaml holds their values)
    images_per_class: int
    seed: int
    min_side: int
    max_side: int
    isic2018_share: float
    # Images in ISIC 2018 training only: per class, plus AKIEC ones that
    # data.akiec=drop excludes.
    isic2018_only_per_class: int = 1
    isic2018_only_akiec: int = 2


def _skin(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    tone = np.array([222, 178, 155]) + rng.normal(0, 12, 3)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    shade = 1.0 + 0.08 * (rng.uniform(-1, 1) * xx + rng.uniform(-1, 1) * yy)
    img = tone[None, None, :] * shade[..., None] + rng.normal(0, 4, (height, width, 3))
    return img


def _lesion_mask(rng: np.random.Generator, height: int, width: int, irregular: float) -> np.ndarray:
    """A soft-edged blob near the centre; ``irregular`` wobbles its border."""
    cy = height * rng.uniform(0.4, 0.6)
    cx = width * rng.uniform(0.4, 0.6)
    radius = min(height, width) * rng.uniform(0.22, 0.34)
    aspect = rng.uniform(0.75, 1.0)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:height, 0:width]
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / aspect
    theta = np.arctan2(v, u)
    wobble = 1.0 + irregular * sum(
        rng.uniform(0.3, 1.0) * np.sin(k * theta + rng.uniform(0, 2 * np.pi)) for k in (3, 5, 7)
    ) / 3
    dist = np.hypot(u, v) / (radius * wobble)
    return np.clip((1.0 - dist) * 6.0, 0.0, 1.0)


def _dots(rng, height, width, mask, n, radius, colour) -> Image.Image:
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    ys, xs = np.nonzero(mask > 0.5)
    if len(ys) == 0:
        return layer
    for i in rng.integers(0, len(ys), n):
        r = radius * rng.uniform(0.6, 1.4)
        draw.ellipse((xs[i] - r, ys[i] - r, xs[i] + r, ys[i] + r), fill=(*colour, 255))
    return layer


def _lines(rng, height, width, mask, n, thickness, colour) -> Image.Image:
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    ys, xs = np.nonzero(mask > 0.5)
    if len(ys) == 0:
        return layer
    for i in rng.integers(0, len(ys), n):
        points = [(float(xs[i]), float(ys[i]))]
        heading = rng.uniform(0, 2 * np.pi)
        for _ in range(6):
            heading += rng.normal(0, 0.6)
            step = min(height, width) * 0.04
            points.append((points[-1][0] + step * np.cos(heading), points[-1][1] + step * np.sin(heading)))
        draw.line(points, fill=(*colour, 255), width=thickness)
    return layer


# Images are drawn at most this large, then resized to their final size.
DRAW_SIDE = 192


def render(code: str, rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """One synthetic dermoscopy-like image of class ``code``, ``width`` x ``height``."""
    final = (width, height)
    scale = min(1.0, DRAW_SIDE / max(height, width))
    height, width = max(32, round(height * scale)), max(32, round(width * scale))
    side = min(height, width)
    img = _skin(rng, height, width)
    irregular = {"MEL": 0.45, "BKL": 0.25, "SCC": 0.3}.get(code, 0.08)
    mask = _lesion_mask(rng, height, width, irregular)
    base = {
        "AK": (205, 105, 105),
        "BCC": (232, 160, 168),
        "BKL": (172, 128, 88),
        "DF": (150, 100, 72),
        "MEL": (55, 35, 32),
        "NV": (125, 78, 48),
        "SCC": (185, 55, 55),
        "VASC": (150, 25, 70),
    }[code]
    colour = np.array(base, dtype=float) + rng.normal(0, 8, 3)
    img = img * (1 - mask[..., None]) + colour[None, None, :] * mask[..., None]
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))

    layers: list[Image.Image] = []
    if code == "AK":  # white scale
        layers.append(_dots(rng, height, width, mask, 40, side * 0.012, (245, 240, 230)))
    elif code == "BCC":  # arborizing vessels
        layers.append(_lines(rng, height, width, mask, 6, max(1, side // 120), (175, 15, 35)))
    elif code == "BKL":  # comedo-like dark openings
        layers.append(_dots(rng, height, width, mask, 25, side * 0.015, (80, 55, 35)))
    elif code == "DF":  # central white patch
        centre = mask > 0.5
        ys, xs = np.nonzero(centre)
        if len(ys):
            cy, cx, r = ys.mean(), xs.mean(), side * 0.07
            layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
            ImageDraw.Draw(layer).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(242, 232, 226, 255))
            layers.append(layer.filter(ImageFilter.GaussianBlur(side * 0.01)))
    elif code == "MEL":  # blue-white veil and irregular dark globules
        layers.append(_dots(rng, height, width, mask, 6, side * 0.05, (95, 105, 140)))
        layers.append(_dots(rng, height, width, mask, 20, side * 0.012, (20, 12, 10)))
    elif code == "NV":  # regular pigment network
        layers.append(_lines(rng, height, width, mask, 10, max(1, side // 200), (95, 58, 35)))
    elif code == "SCC":  # yellow keratin crust
        layers.append(_dots(rng, height, width, mask, 3, side * 0.06, (236, 218, 150)))
    elif code == "VASC":  # red-purple lacunae
        layers.append(_dots(rng, height, width, mask, 14, side * 0.035, (185, 20, 55)))
    for layer in layers:
        out.paste(layer, (0, 0), layer)
    if rng.random() < 0.5:  # a hair or two
        hair = _lines(rng, height, width, np.ones((height, width)), 2, max(1, side // 150), (40, 30, 25))
        out.paste(hair, (0, 0), hair)
    return out.filter(ImageFilter.GaussianBlur(0.6)).resize(final, Image.Resampling.BICUBIC)


def _image_size(rng: np.random.Generator, spec: DemoSpec) -> tuple[int, int]:
    height = int(rng.integers(spec.min_side, spec.max_side + 1))
    aspect = rng.choice([1.0, 4 / 3, 3 / 2])
    width = min(int(height * aspect), int(spec.max_side * 1.5))
    return height, width


def _onehot(labels: list[str], columns: tuple[str, ...], fmt: str) -> pd.DataFrame:
    table = pd.DataFrame(0, index=range(len(labels)), columns=list(columns))
    for i, label in enumerate(labels):
        table.loc[i, label] = 1
    return table.astype(float if fmt == "float" else int)


def generate(root: Path, spec: DemoSpec) -> Path:
    """Write the demo dataset into ``root`` (which must not hold other data)."""
    rng = np.random.default_rng(spec.seed)
    r2019, r2018 = RELEASES["isic2019_train"], RELEASES["isic2018_train"]
    (root / r2019.input_dir).mkdir(parents=True, exist_ok=True)
    (root / r2018.input_dir).mkdir(parents=True, exist_ok=True)

    rows, next_id, lesion = [], FIRST_ID, 0
    for code in CODES:
        remaining = spec.images_per_class
        while remaining:
            # Lesions of 1-3 photographs; 1 in 5 images has no lesion id.
            shots = min(remaining, int(rng.choice([1, 1, 2, 3])))
            lesion_id = "" if rng.random() < 0.2 else f"IL_{lesion:07d}"
            lesion += 1
            age = float(rng.integers(4, 17) * 5)
            sex = str(rng.choice(["male", "female"]))
            site = str(rng.choice(SITES))
            in_2018 = bool(rng.random() < spec.isic2018_share)
            for _ in range(shots if lesion_id else 1):
                rows.append((f"ISIC_{next_id:07d}", code, lesion_id, age, sex, site, in_2018))
                next_id += 1
                remaining -= 1
    table = pd.DataFrame(rows, columns=["image", "label", "lesion_id", "age", "sex", "site", "in_2018"])

    for image_id, code in zip(table["image"], table["label"]):
        height, width = _image_size(rng, spec)
        render(code, rng, height, width).save(root / r2019.input_dir / f"{image_id}.jpg", quality=90)
    gt = pd.concat([table[["image"]], _onehot(list(table["label"]), ISIC2019_COLUMNS, "int")], axis=1)
    gt.to_csv(root / r2019.ground_truth, index=False)
    meta = table.rename(columns={"age": "age_approx", "site": "anatom_site_general"})
    meta[["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]].to_csv(
        root / METADATA_2019, index=False
    )

    # ISIC 2018 training: a share of the 2019 images (same files, AK and SCC
    # folded into AKIEC), plus a few images that are only in 2018.
    old = table[table["in_2018"]][["image", "label"]].copy()
    only = [code for code in ISIC2018_COLUMNS if code != "AKIEC" for _ in range(spec.isic2018_only_per_class)]
    only += ["AKIEC"] * spec.isic2018_only_akiec
    extra = pd.DataFrame(
        {"image": [f"ISIC_{next_id + i:07d}" for i in range(len(only))], "label": only}
    )
    for image_id, code in zip(extra["image"], extra["label"]):
        height, width = _image_size(rng, spec)
        look = "AK" if code == "AKIEC" else code
        render(look, rng, height, width).save(root / r2018.input_dir / f"{image_id}.jpg", quality=90)
    for image_id in old["image"]:
        shutil.copyfile(root / r2019.input_dir / f"{image_id}.jpg", root / r2018.input_dir / f"{image_id}.jpg")
    old["label"] = old["label"].replace({"AK": "AKIEC", "SCC": "AKIEC"})
    old = pd.concat([old, extra], ignore_index=True)
    gt_2018 = pd.concat([old[["image"]], _onehot(list(old["label"]), ISIC2018_COLUMNS, "float")], axis=1)
    gt_2018.to_csv(root / r2018.ground_truth, index=False)
    return root


def ensure(root: Path, spec: DemoSpec) -> Path:
    """Generate the demo into ``root`` unless the same demo is already there.

    Concurrent jobs (a sweep on a parallel launcher) take turns on a lock
    file beside ``root``: the first generates, the others find it done.
    """
    marker = root / MARKER
    wanted = asdict(spec)
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and json.loads(marker.read_text()) == wanted:
            return root
        return _generate_into(root, spec, wanted)


def _generate_into(root: Path, spec: DemoSpec, wanted: dict) -> Path:
    marker = root / MARKER
    if root.exists() and any(root.iterdir()) and not marker.is_file():
        raise DataError(
            f"{root} holds files that are not a generated demo dataset; "
            "refusing to overwrite them. Point data.root at an empty or new directory."
        )
    log.info("generating the demo dataset in %s (seed %d)", root, spec.seed)
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    generate(staging, spec)
    (staging / MARKER).write_text(json.dumps(wanted, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    return root
