"""How well the out-of-scope gate turns away what it should: offline image sets, and the figures per set.

The gate itself (``dermascan.modeling.ood``) is fitted on the train and val
splits. Judging it needs images it must refuse, and those must be
reproducible without a download, so every set here is built locally:

- ``skimage``: the sample images scikit-image ships inside its wheel
  (``SKIMAGE_NAMES``): natural photos (an astronaut, a cat, coffee, a
  rocket), a retina fundus image, histology, a telescope image, text and test
  patterns. What a phone points at besides a lesion.
- ``synthetic``: flat colours (black and white, as a covered lens or an
  overexposed frame gives, and skin tones: a photo of plain skin), uniform
  noise, gradients, rendered text and drawn app screenshots. Seeded, so
  always the same pixels.
- ``corrupted``: the evaluated split's own images, blurred, rotated inside a
  larger black canvas, and over- and under-exposed. These *are* lesions,
  photographed badly. The gate should reject them too: the app then asks for
  a better photo, which is the right answer to a photo the classifier was
  not trained to read. A high rejection share is good there; it is reported,
  never counted against the gate (``CORRUPTED_NOTE``).

Every image of the first two sets goes through evaluation's own path before
it is scored (``as_evaluated``): the resize cache's PIL resize with the run's
method, its JPEG at the run's quality, and the pipeline's decode. A gate
that told sets apart by their resize or their compression would be measuring
the plumbing. The corrupted images are made from the test images as the
model sees them, and resized back with the cache's PIL filter where the
corruption changes their size.

The figures per set (``set_figures``): ``n``; ``auroc``, the area under the
ROC of the gate's score with out-of-scope as the positive class and the
evaluated split as the negative; ``fpr_at_95_tpr``, the share of the set
scored *in* scope at the score that keeps 95% of the evaluated split in
scope (a property of the score alone: lower is better); and ``rejected``, the
share scored above the gate's own threshold, fitted on val (what the app
would do).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

from dermascan.data.cache import METHODS

log = logging.getLogger("dermascan.evaluation.ood")

#: The sample images of ``skimage.data`` that are inside the wheel (the others are downloaded on first use).
SKIMAGE_NAMES: tuple[str, ...] = (
    "astronaut", "binary_blobs", "brick", "camera", "cat", "cell", "checkerboard", "chelsea", "clock", "coffee",
    "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo",
    "microaneurysms", "moon", "page", "retina", "rocket", "shepp_logan_phantom", "text",
)
#: Arguments for the samples that are generated rather than stored: binary_blobs is random unless seeded.
SKIMAGE_ARGUMENTS: dict[str, dict[str, Any]] = {"binary_blobs": {"rng": 0}}
#: The synthetic images' size (height, width): a landscape phone frame, squashed to a square like any upload.
SYNTHETIC_SHAPE = (480, 640)
FLAT_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128),
    "skin_light": (241, 204, 178), "skin_medium": (198, 142, 102), "skin_dark": (105, 68, 45),
    "red": (200, 30, 40), "blue": (30, 70, 200),
}
WORDS = ("lesion", "photo", "upload", "settings", "account", "cancel", "continue", "the", "of", "and", "image",
         "results", "camera", "privacy", "help", "share", "download", "message", "today", "profile")
#: Corruptions of the evaluated images: blur radius as a share of the side, the canvas side as a multiple of
#: the image's, and the exposure factors (x4: two stops over; x1/8: three stops under).
BLUR_RADIUS = 0.06
CANVAS_SCALE = 1.5
EXPOSURES: dict[str, float] = {"overexposed": 4.0, "underexposed": 0.125}
CORRUPTIONS: tuple[str, ...] = ("blur", "rotated", *EXPOSURES)
CORRUPTED_NOTE = (
    "Corrupted sets are real lesions photographed badly (heavy blur, rotated inside a black frame, over- and "
    "under-exposed). Rejecting them is the right answer: the app asks for a better photo instead of "
    "classifying one the model was not trained to read. A high rejection share is good here; it is reported, "
    "not counted against the gate."
)
#: The share of in-distribution images kept in scope at which ``fpr_at_tpr`` is read.
TPR = 0.95
#: The synthetic set's seed: every run is judged on the same images.
SYNTHETIC_SEED = 0


@dataclass(frozen=True)
class ImageSet:
    """Named images, uint8 [N, S, S, 3] in ``names`` order."""

    names: list[str]
    images: np.ndarray


# --- the sets ---------------------------------------------------------------------


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Any scikit-image sample as RGB uint8 [H, W, 3]: grey, bool, RGBA (over white) and float images alike."""
    from skimage import color, util

    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 4:
        image = color.rgba2rgb(image)
    image = util.img_as_ubyte(image)
    if image.ndim == 2:
        image = color.gray2rgb(image)
    return np.ascontiguousarray(image)


def skimage_images() -> dict[str, np.ndarray]:
    """scikit-image's bundled samples (``SKIMAGE_NAMES``), RGB uint8 at their own sizes. Offline: they ship in the wheel."""
    from skimage import data

    return {name: to_rgb_uint8(getattr(data, name)(**SKIMAGE_ARGUMENTS.get(name, {}))) for name in SKIMAGE_NAMES}


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font: the same glyphs on every machine, no system font needed."""
    return ImageFont.load_default(size=size)


def _sentence(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, words))


def text_image(rng: np.random.Generator, ink: tuple[int, int, int], paper: tuple[int, int, int],
               shape: tuple[int, int] = SYNTHETIC_SHAPE) -> np.ndarray:
    """Lines of rendered text, as a photo of a page or a message would hold."""
    height, width = shape
    canvas = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(canvas)
    y, size = 20, 28
    while y < height - size:
        draw.text((24, y), _sentence(rng, 5), fill=ink, font=_font(size))
        y += int(size * 1.5)
    return np.asarray(canvas)


def ui_screenshot(rng: np.random.Generator, dark: bool, shape: tuple[int, int] = SYNTHETIC_SHAPE) -> np.ndarray:
    """A drawn app window (title bar, window buttons, sidebar, text, an input field, buttons): a screenshot sent by mistake."""
    height, width = shape
    background, panel, ink = ((32, 33, 36), (48, 49, 54), (230, 230, 230)) if dark else \
        ((246, 246, 248), (225, 228, 234), (30, 30, 30))
    canvas = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, width, 40), fill=(60, 64, 72) if dark else (210, 214, 222))
    for i, colour in enumerate(((237, 106, 94), (245, 191, 79), (98, 197, 84))):
        draw.ellipse((14 + 24 * i, 13, 28 + 24 * i, 27), fill=colour)
    draw.text((110, 10), _sentence(rng, 3), fill=ink, font=_font(18))
    draw.rectangle((0, 40, 150, height), fill=panel)
    for i in range(8):
        draw.text((16, 60 + 36 * i), _sentence(rng, 1), fill=ink, font=_font(16))
    for i in range(5):
        draw.text((176, 64 + 34 * i), _sentence(rng, 6), fill=ink, font=_font(17))
    draw.rounded_rectangle((176, 260, width - 30, 300), radius=8, outline=(120, 120, 130), width=2)
    draw.text((190, 270), _sentence(rng, 2), fill=(140, 140, 150), font=_font(16))
    for i, (label, fill) in enumerate((("Cancel", (150, 150, 160)), ("Continue", (26, 115, 232)))):
        x = width - 300 + 140 * i
        draw.rounded_rectangle((x, height - 80, x + 120, height - 36), radius=10, fill=fill)
        draw.text((x + 18, height - 70), label, fill=(255, 255, 255), font=_font(18))
    return np.asarray(canvas)


def gradients(shape: tuple[int, int] = SYNTHETIC_SHAPE) -> dict[str, np.ndarray]:
    """Linear and radial gradients: smooth images with no texture at all."""
    height, width = shape
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    horizontal = x / (width - 1)
    vertical = y / (height - 1)
    radial = np.clip(np.hypot(x - width / 2, y - height / 2) / (0.5 * np.hypot(width, height)), 0, 1)

    def rgb(*channels: np.ndarray) -> np.ndarray:
        return np.round(np.stack(channels, -1) * 255).astype(np.uint8)

    return {
        "gradient_grey_horizontal": rgb(horizontal, horizontal, horizontal),
        "gradient_colour_vertical": rgb(vertical, 1 - vertical, np.full_like(vertical, 0.5)),
        "gradient_colour_diagonal": rgb((horizontal + vertical) / 2, horizontal, 1 - vertical),
        # dark centre, skin-coloured rim: the plainest caricature of a lesion
        "gradient_radial_skin": rgb(0.3 + 0.65 * radial, 0.2 + 0.6 * radial, 0.15 + 0.55 * radial),
    }


def synthetic_images(seed: int, shape: tuple[int, int] = SYNTHETIC_SHAPE) -> dict[str, np.ndarray]:
    """Flat colours, uniform noise, gradients, text and app screenshots, RGB uint8 [H, W, 3]; the same for one ``seed``."""
    rng = np.random.default_rng(seed)
    height, width = shape
    images = {f"flat_{name}": np.full((height, width, 3), colour, np.uint8) for name, colour in FLAT_COLOURS.items()}
    images["noise_colour"] = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    images["noise_grey"] = np.repeat(rng.integers(0, 256, (height, width, 1), dtype=np.uint8), 3, axis=-1)
    # coarse noise: 16-px blocks, so the squash to the model's size keeps it noise rather than a flat grey
    blocks = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    images["noise_colour_blocks"] = np.kron(blocks, np.ones((16, 16, 1), np.uint8))
    images.update(gradients(shape))
    images["text_black_on_white"] = text_image(rng, (0, 0, 0), (255, 255, 255), shape)
    images["text_white_on_black"] = text_image(rng, (255, 255, 255), (0, 0, 0), shape)
    images["text_blue_on_cream"] = text_image(rng, (20, 40, 140), (250, 244, 225), shape)
    images["ui_light"] = ui_screenshot(rng, dark=False, shape=shape)
    images["ui_dark"] = ui_screenshot(rng, dark=True, shape=shape)
    return images


def as_evaluated(images: Mapping[str, np.ndarray], image_size: int, cache: Mapping[str, Any]) -> ImageSet:
    """The images as evaluation feeds the model: resized and JPEG-cached with the run's cache settings, then decoded.

    Runs the real path (``rundir.load_images``: the resize cache and the
    evaluation pipeline) over PNG copies in a temporary folder, with a
    temporary cache, so the run's own cache is never touched.
    """
    from dermascan.rundir import load_images  # TensorFlow: imported where needed

    names = list(images)
    with tempfile.TemporaryDirectory(prefix="dermascan-ood-") as tmp:
        sources = Path(tmp) / "sources"
        sources.mkdir()
        paths = []
        for name in names:
            path = sources / f"{name}.png"
            Image.fromarray(to_rgb_uint8(images[name])).save(path)
            paths.append(str(path))
        frame = pd.DataFrame({"image_id": names, "path": paths, "label": None})
        settings = {**cache, "dir": str(Path(tmp) / "cache")}
        return ImageSet(names, load_images(frame, image_size, settings))


def reference_sets(image_size: int, cache: Mapping[str, Any], seed: int = SYNTHETIC_SEED) -> dict[str, ImageSet]:
    """The out-of-scope sets the gate is judged on (``skimage``, ``synthetic``), as evaluation feeds the model."""
    return {
        "skimage": as_evaluated(skimage_images(), image_size, cache),
        "synthetic": as_evaluated(synthetic_images(seed), image_size, cache),
    }


def outside_images(image_size: int, cache: Mapping[str, Any], seed: int = SYNTHETIC_SEED) -> np.ndarray:
    """Every reference out-of-scope image in one uint8 array [N, S, S, 3] (e.g. for checking an export's gate)."""
    return np.concatenate([s.images for s in reference_sets(image_size, cache, seed).values()])


# --- corruptions of real lesion photos ------------------------------------------------


def blur(image: np.ndarray, radius: float = BLUR_RADIUS) -> np.ndarray:
    """A heavy Gaussian blur: ``radius`` is a share of the image's side, so it is as heavy at any size."""
    pil = Image.fromarray(image)
    return np.asarray(pil.filter(ImageFilter.GaussianBlur(radius * max(pil.size))))


def rotated_in_canvas(image: np.ndarray, method: str, scale: float = CANVAS_SCALE) -> np.ndarray:
    """Rotated by 90 degrees, centred in a black canvas ``scale`` times larger, resized back to the image's size."""
    rotated = Image.fromarray(np.ascontiguousarray(np.rot90(image)))
    side = int(round(max(rotated.size) * scale))
    canvas = Image.new("RGB", (side, side), (0, 0, 0))
    canvas.paste(rotated, ((side - rotated.size[0]) // 2, (side - rotated.size[1]) // 2))
    return np.asarray(canvas.resize((image.shape[1], image.shape[0]), METHODS[method]))


def exposed(image: np.ndarray, factor: float) -> np.ndarray:
    """Exposure scaled by ``factor`` (brightness times factor, clipped to 0-255)."""
    return np.asarray(ImageEnhance.Brightness(Image.fromarray(image)).enhance(factor))


def corrupt(images: np.ndarray, method: str) -> dict[str, np.ndarray]:
    """Each corruption (``CORRUPTIONS``) of a batch of uint8 images [N, S, S, 3], same shape and dtype."""
    images = np.asarray(images, np.uint8)
    if not len(images):
        return {name: images.copy() for name in CORRUPTIONS}
    one = {
        "blur": blur,
        "rotated": lambda image: rotated_in_canvas(image, method),
        **{name: (lambda image, f=factor: exposed(image, f)) for name, factor in EXPOSURES.items()},
    }
    return {name: np.stack([fn(image) for image in images]) for name, fn in one.items()}


# --- the figures ----------------------------------------------------------------------


def _labelled(in_scores: Any, out_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """(is out of scope, score) over both sets, for scikit-learn's ROC functions."""
    in_scores, out_scores = np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64)
    truth = np.concatenate([np.zeros(len(in_scores), bool), np.ones(len(out_scores), bool)])
    return truth, np.concatenate([in_scores, out_scores])


def auroc(in_scores: Any, out_scores: Any) -> Optional[float]:
    """AUROC of the score with out-of-scope as the positive class; None when a side is empty."""
    from sklearn.metrics import roc_auc_score

    truth, scores = _labelled(in_scores, out_scores)
    if truth.all() or not truth.any():
        return None
    return float(roc_auc_score(truth, scores))


def fpr_at_tpr(in_scores: Any, out_scores: Any, tpr: float = TPR) -> Optional[float]:
    """The share of out-of-scope images scored in scope at the lowest threshold keeping ``tpr`` of the in-distribution ones.

    In-distribution images are the positives here, as the OOD literature
    reads "FPR at 95% TPR": keep 95% of real lesions, and count the
    out-of-scope images let through. None when a side is empty.
    """
    from sklearn.metrics import roc_curve

    truth, scores = _labelled(in_scores, out_scores)
    if truth.all() or not truth.any():
        return None
    # in scope = positive; a lower score is more in scope
    fpr, kept, _ = roc_curve(~truth, -scores, drop_intermediate=False)
    return float(fpr[np.searchsorted(kept, tpr - 1e-12, side="left")])


def rejected_share(scores: Any, threshold: float) -> Optional[float]:
    """The share of images the gate turns away (score > threshold); None for no images."""
    scores = np.asarray(scores, np.float64)
    return float((scores > threshold).mean()) if len(scores) else None


def set_figures(in_scores: Any, out_scores: Any, threshold: float) -> dict[str, Any]:
    """metrics.json's figures of one out-of-scope set against the evaluated split (see the module docstring)."""
    return {
        "n": int(len(out_scores)),
        "auroc": auroc(in_scores, out_scores),
        "fpr_at_95_tpr": fpr_at_tpr(in_scores, out_scores, TPR),
        "rejected": rejected_share(out_scores, threshold),
    }


def score_table(scores: Mapping[str, tuple[list[str], np.ndarray]], threshold: float) -> pd.DataFrame:
    """``out_of_scope_scores.csv``: one row per scored image, ``set, image, score, rejected``."""
    frames = [pd.DataFrame({"set": name, "image": list(images), "score": np.asarray(values, np.float64)})
              for name, (images, values) in scores.items()]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["set", "image", "score"])
    table["rejected"] = table["score"] > threshold
    return table
