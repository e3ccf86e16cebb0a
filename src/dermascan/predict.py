"""``python -m dermascan.predict``: an exported model over a folder of images, in the ISIC 2019 submission layout.

    python -m dermascan.predict export_dir=runs/train/<ts>/export images=ISIC_2019_Test_Input out=predictions.csv
    python -m dermascan.predict export_dir=... images=ISIC_2019_Test_Metadata.csv image_dir=ISIC_2019_Test_Input out=...
    python -m dermascan.predict export_dir=... images=... out=... unk=false runtime=savedmodel

What it reads (``images``):

- **a folder**, searched recursively in sorted order. A file is an image
  candidate when its name ends in an image suffix (``IMAGE_SUFFIXES``) or
  its first bytes are an image signature (so a JPEG without a suffix is
  found); anything else (``LICENSE.txt``, a metadata CSV) is skipped and
  counted, not reported. Hidden files and folders (``.name``, macOS'
  ``._name`` and ``__MACOSX``) are skipped: they are archive debris, not
  images. A candidate that cannot be decoded goes to the failures report.
- **a CSV with an ``image`` column** (``.csv``), in its row order. Each
  value is a path (absolute, or relative to ``image_dir``, which defaults
  to the CSV's folder) when that file exists; otherwise an id, looked up as
  ``<image_dir>/<id><suffix>`` for each suffix of ``IMAGE_SUFFIXES`` (lower
  case, then upper case). A value that resolves to nothing is a failure.
- **one image file**.

An image's id is its file name without the suffix (``ISIC_0034321.jpg`` ->
``ISIC_0034321``), as the ISIC files name them. An id seen twice keeps its
first image; the second goes to the failures report (the scorer refuses
duplicate rows).

Each image is decoded exactly as the service decodes an upload
(``dermascan.serve.images.prepare_image``: EXIF orientation, colour modes,
the hostile-image limits, the training resize named in ``labels.json``).

What it writes:

- ``out``: ``image``, the 8 class columns in the official ISIC 2019 order
  (``classes.ISIC2019_COLUMNS``: MEL, NV, BCC, AK, BKL, DF, VASC, SCC) and,
  with ``unk=true``, ``UNK``; nothing else (the official scorer refuses any
  other column). Rows are written to ``<out>.partial`` a batch at a time
  and the file is renamed to ``out`` when the run ends: an interrupted run
  leaves a ``.partial`` CSV holding every batch finished so far, and never a
  truncated file under the name a scorer would be given.
- ``failures`` (default ``<out stem>_failures.csv`` next to ``out``):
  ``image, path, reason``, one row per image that could not be predicted,
  written as they happen. An unreadable image never stops the run.

Memory is bounded: one batch of ``batch_size`` decoded images is held at a
time (``batches`` decodes a batch only when the previous one has been
predicted and written); the list of paths is all that grows with the folder.

UNK (``unk=true``, the default): the exported model's second output is the
out-of-scope score of ``dermascan.modeling.ood`` (score > threshold: out of
scope; the threshold is ``labels.json["out_of_scope"]["threshold"]``). It
becomes a probability with the sigmoid the ISIC challenges give for turning
a thresholded score into [0, 1]::

    UNK = sigmoid((score - threshold) / (unk_scale * threshold))

so UNK is 0.5 exactly at the gate's threshold, and a column thresholded at
0.5 (what the scorer's per-category sensitivity and specificity do) makes
the gate's own in/out decision. ``unk_scale`` (0.05) is relative to the
threshold because the score's units depend on the model (about 1 for
training-like images): UNK is 0.12 at 0.9x the threshold and 0.88 at 1.1x.
The scale changes no AUC (the map is monotone). The 8 class probabilities
are then multiplied by (1 - UNK), so each row sums to 1 and the scorer's
argmax over the 9 columns (its balanced accuracy; a tied maximum counts as
wrong) says UNK for every image the gate rejects: there UNK > 0.5 >= (1 -
UNK) * max class. Without the rescaling an out-of-scope photo with a
confident-looking class (46% of natural photos get one >= 0.5) would keep
that class. The cost: an in-scope image just under the threshold whose
top class is weak can also come out as UNK (only when score > threshold *
(1 + unk_scale * ln(top class probability)), i.e. within 10.4% of the
threshold at most). The class columns divided by (1 - UNK) are the
model's softmax probabilities.

An export without a gate has no UNK to give: ``unk=true`` then stops at
once, naming ``unk=false`` (the 8-class layout) and re-exporting with the gate.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TextIO

import hydra
import numpy as np
from omegaconf import DictConfig

from dermascan import cli
from dermascan.artifacts import LABELS, read_labels
from dermascan.checksums import verify_manifest
from dermascan.classes import ISIC2019_COLUMNS
from dermascan.config import PredictConfig, config_dir
from dermascan.errors import ConfigError, DermascanError
from dermascan.runtime import load_predictor
from dermascan.serve.images import (
    SIGNATURES,
    UNSUPPORTED_BRANDS,
    ImageError,
    prepare_image,
)

log = logging.getLogger("dermascan.predict")

UNK = "UNK"
CLASS_COLUMNS: tuple[str, ...] = tuple(c for c in ISIC2019_COLUMNS if c != UNK)
FAILURE_COLUMNS = ("image", "path", "reason")
# Written with 6 decimals, as the run dir's predictions.csv (evaluation.scoring.write).
FLOAT_FORMAT = "%.6f"
PARTIAL_SUFFIX = ".partial"
# Names that make a file an image candidate whatever its first bytes (HEIC/AVIF: reported as unsupported).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif",
                  ".mpo", ".heic", ".heif", ".avif")
SNIFF_BYTES = 16


class PredictError(DermascanError):
    """Batch prediction cannot start: a bad export, input or output path."""


@dataclass(frozen=True)
class Item:
    """One image to predict; ``reason`` is set when it failed before decoding (not found, duplicate id)."""

    image_id: str
    path: Optional[Path]
    reason: Optional[str] = None


@dataclass(frozen=True)
class Batch:
    """Decoded images (uint8 [n, S, S, 3]) with their items, and the items of the batch that could not be read."""

    items: list[Item]
    pixels: np.ndarray
    failed: list[tuple[Item, str]]


@dataclass(frozen=True)
class Model:
    """What prediction needs from an export: the predictor, its input contract, class order and gate."""

    predict: Callable[[np.ndarray], Any]  # dermascan.runtime.Predictor: an [N, 8] array or a dict (see split_output)
    size: int
    method: str
    codes: tuple[str, ...]  # the model's output order (labels.json)
    threshold: Optional[float]  # labels.json out_of_scope.threshold; None: no gate


@dataclass(frozen=True)
class Summary:
    predicted: int
    failed: int
    skipped: int  # folder files that are not images
    seconds: float
    out: Path
    failures: Path

    @property
    def rate(self) -> float:
        return (self.predicted + self.failed) / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------- configuration


def check(cfg: Any) -> Any:
    """Value checks the schema's types cannot express; ConfigError naming the key."""
    for key in ("batch_size", "workers", "max_file_bytes", "max_pixels", "max_jpeg_scans", "log_every"):
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {cfg[key]}")
    if cfg.draft_factor < 0:
        raise ConfigError(f"draft_factor must be >= 0 (0 turns reduced-scale JPEG decoding off), got {cfg.draft_factor}")
    if cfg.num_threads is not None and cfg.num_threads < 1:
        raise ConfigError(f"num_threads must be null or >= 1, got {cfg.num_threads}")
    if not (cfg.unk_scale > 0 and math.isfinite(cfg.unk_scale)):
        raise ConfigError(f"unk_scale must be a finite number > 0, got {cfg.unk_scale}")
    return cfg


def failures_path(out: Path, failures: Optional[str]) -> Path:
    """The failures report: ``failures`` when given, else ``<out stem>_failures.csv`` next to ``out``."""
    return Path(failures) if failures else out.with_name(f"{out.stem}_failures.csv")


# ---------------------------------------------------------------- the export


def gate_threshold(labels: dict) -> Optional[float]:
    """labels.json's out-of-scope threshold; None when the export has no gate; PredictError when malformed."""
    gate = labels.get("out_of_scope")
    if gate is None:
        return None
    if not isinstance(gate, dict):
        raise PredictError(f"{LABELS}: out_of_scope must be an object with a 'threshold', got {repr(gate)[:120]}")
    threshold = gate.get("threshold")
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or threshold <= 0:
        raise PredictError(f"{LABELS}: out_of_scope.threshold must be a finite number > 0, got {threshold!r}")
    return float(threshold)


def no_gate_message(export_dir: Path) -> str:
    return (
        f"{export_dir} has no out-of-scope gate ({LABELS} states no out_of_scope.threshold, or the model has no "
        "out_of_scope output), so there is no score to derive the UNK column from. Pass unk=false for the 8-class "
        "layout (image, MEL, NV, BCC, AK, BKL, DF, VASC, SCC), or re-export a model trained with the gate "
        "(python -m dermascan.export run_dir=...)."
    )


def load_export(export_dir: Path, runtime: str, tflite: str, num_threads: Optional[int], unk: bool) -> Model:
    """Verify and load an export as the service does, then probe it once with a blank image.

    The probe makes a model whose output does not match labels.json, or a
    gate that is promised but absent, stop the run before any image is read.
    """
    # The service's own labels.json readers, so that both read an export the same way.
    from dermascan.serve.model import input_size, read_classes, resize_method

    export_dir = Path(export_dir)
    verify_manifest(export_dir)
    labels = read_labels(export_dir)
    codes = tuple(c["code"] for c in read_classes(labels, export_dir / LABELS))
    if sorted(codes) != sorted(CLASS_COLUMNS):
        raise PredictError(f"{export_dir / LABELS} lists the classes {list(codes)}; the ISIC 2019 layout needs "
                           f"exactly {list(CLASS_COLUMNS)}")
    threshold = gate_threshold(labels)
    if unk and threshold is None:
        raise PredictError(no_gate_message(export_dir))
    model = Model(load_predictor(export_dir, runtime, tflite=tflite, num_threads=num_threads),
                  input_size(labels), resize_method(labels), codes, threshold)
    try:
        probe = model.predict(np.zeros((1, model.size, model.size, 3), np.uint8))
    except Exception as err:  # noqa: BLE001 - each runtime raises its own types; name the export once
        raise PredictError(f"the {runtime} model in {export_dir} failed its warm-up prediction: {err}") from err
    _, score = split_output(probe, len(codes))
    if unk and score is None:
        raise PredictError(no_gate_message(export_dir))
    log.info("loaded %s (%s%s, %d px, %s resize, %s)", export_dir, runtime, f" {tflite}" if runtime == "tflite" else "",
             model.size, model.method, f"gate threshold {threshold:g}" if threshold is not None else "no gate")
    return model


def split_output(output: Any, classes: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(probabilities [N, classes], out-of-scope score [N] or None) from a predictor's output.

    Accepts both contracts of ``dermascan.runtime``: a plain [N, classes]
    array (an export without a gate, and every predictor before the gate),
    and ``{"probabilities": [N, classes], "out_of_scope": [N]}`` (the second
    key absent without a gate).
    """
    if isinstance(output, dict):
        if "probabilities" not in output:
            raise PredictError(f"the model's outputs {sorted(output)} have no 'probabilities'")
        probabilities, score = output["probabilities"], output.get("out_of_scope")
    else:
        probabilities, score = output, None
    probabilities = np.asarray(probabilities, np.float32)
    if probabilities.ndim != 2 or probabilities.shape[1] != classes:
        raise PredictError(f"the model returns probabilities of shape {probabilities.shape}; expected [N, {classes}]")
    if score is None:
        return probabilities, None
    score = np.asarray(score, np.float32).reshape(-1)
    if score.shape[0] != probabilities.shape[0]:
        raise PredictError(f"the model returns {score.shape[0]} out-of-scope scores for {probabilities.shape[0]} images")
    return probabilities, score


# ---------------------------------------------------------------- UNK


def unk_probability(score: np.ndarray, threshold: float, scale: float) -> np.ndarray:
    """sigmoid((score - threshold) / (scale * threshold)): 0.5 at the threshold, monotone in the score."""
    z = (np.asarray(score, np.float64) - threshold) / (scale * threshold)
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # the sigmoid, without overflow in exp for far-out scores


def submission_values(probabilities: np.ndarray, codes: Sequence[str], unk: Optional[np.ndarray]) -> np.ndarray:
    """The rows of the submission: class columns in the official order, then UNK (class columns times 1 - UNK)."""
    ordered = np.asarray(probabilities, np.float64)[:, [list(codes).index(c) for c in CLASS_COLUMNS]]
    if unk is None:
        return ordered
    unk = np.asarray(unk, np.float64)
    return np.concatenate([ordered * (1.0 - unk)[:, None], unk[:, None]], axis=1)


# ---------------------------------------------------------------- finding images


def looks_like_image(head: bytes) -> bool:
    """True when the first bytes are an image signature the service knows (HEIC/AVIF included, to be reported)."""
    if any(head.startswith(magic) and (name != "WEBP" or head[8:12] == b"WEBP") for magic, name in SIGNATURES):
        return True
    return head[4:8] == b"ftyp" and head[8:12] in UNSUPPORTED_BRANDS


def is_candidate(path: Path) -> bool:
    """An image suffix, or image content; an unreadable file with an image suffix is still a candidate (reported)."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            return looks_like_image(f.read(SNIFF_BYTES))
    except OSError:
        return False


def hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def walk_folder(folder: Path) -> tuple[list[Path], int]:
    """(image candidates in sorted order, files skipped as not images), recursively."""
    found, skipped = [], 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not hidden(d))
        for name in sorted(files):
            if hidden(name):
                continue
            path = Path(root) / name
            if is_candidate(path):
                found.append(path)
            else:
                skipped += 1
    return found, skipped


def resolve(value: str, image_dir: Path) -> Optional[Path]:
    """A CSV value as a path (absolute or under ``image_dir``) when that file exists, else as an id with a suffix."""
    value = value.strip()
    if not value:
        return None
    direct = Path(value) if Path(value).is_absolute() else image_dir / value
    if direct.is_file():
        return direct
    for suffix in (*IMAGE_SUFFIXES, *(s.upper() for s in IMAGE_SUFFIXES)):
        path = image_dir / f"{value}{suffix}"
        if path.is_file():
            return path
    return None


def read_csv_values(path: Path) -> list[str]:
    """The ``image`` column of a CSV (streamed; a UTF-8 byte-order mark is allowed)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "image" not in reader.fieldnames:
                raise PredictError(f"{path} has no 'image' column (its header: {reader.fieldnames}); it needs one, "
                                   "holding image ids or paths")
            return [row["image"] or "" for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise PredictError(f"cannot read {path}: {err}") from None


def image_id(path: Path) -> str:
    """The ISIC id of an image file: its name without the suffix."""
    return path.stem if path.suffix else path.name


def with_unique_ids(items: Iterable[Item]) -> list[Item]:
    """Items with a repeated id become failures, naming the image that kept it (the scorer refuses duplicates)."""
    seen: dict[str, Optional[Path]] = {}
    unique = []
    for item in items:
        if item.reason is None and item.image_id in seen:
            item = Item(item.image_id, item.path, f"duplicate image id: {seen[item.image_id]} has the same id")
        elif item.reason is None:
            seen[item.image_id] = item.path
        unique.append(item)
    return unique


def find_images(images: Path, image_dir: Optional[Path] = None) -> tuple[list[Item], int]:
    """(the items to predict, files skipped as not images) for a folder, a CSV or one image; see the module docstring."""
    images = Path(images)
    if images.is_dir():
        paths, skipped = walk_folder(images)
        return with_unique_ids(Item(image_id(p), p) for p in paths), skipped
    if not images.is_file():
        raise PredictError(f"images={images} does not exist: give a folder of images, a CSV with an 'image' column, "
                           "or one image")
    if images.suffix.lower() != ".csv":
        return [Item(image_id(images), images)], 0
    base = Path(image_dir) if image_dir else images.parent
    if not base.is_dir():
        raise PredictError(f"image_dir={base} is not a folder")
    items = []
    for value in read_csv_values(images):
        path = resolve(value, base)
        if path is None:
            reason = "empty 'image' value" if not value.strip() else (
                f"not found: no file {value!r} or {value}.jpg (or another image suffix) in {base}")
            items.append(Item(Path(value.strip()).stem or value, None, reason))
        else:
            items.append(Item(image_id(path), path))
    return with_unique_ids(items), 0


# ---------------------------------------------------------------- decoding and batching


@dataclass(frozen=True)
class Limits:
    """The service's hostile-image limits (``configs/predict.yaml``, the values of ``configs/serve.yaml``)."""

    max_file_bytes: int
    max_pixels: int
    draft_factor: int
    max_jpeg_scans: int


def decode(item: Item, size: int, method: str, limits: Limits) -> tuple[Optional[np.ndarray], Optional[str]]:
    """(pixels, None) or (None, reason): one image file, read and prepared exactly as the service prepares an upload."""
    if item.reason is not None or item.path is None:
        return None, item.reason or "no file"
    try:
        length = item.path.stat().st_size
        if length > limits.max_file_bytes:
            return None, f"file_too_large: {length} bytes; the limit is max_file_bytes={limits.max_file_bytes}"
        data = item.path.read_bytes()
        prepared = prepare_image(data, size, method, max_pixels=limits.max_pixels, draft_factor=limits.draft_factor,
                                 max_jpeg_scans=limits.max_jpeg_scans)
    except ImageError as err:
        return None, f"{err.code}: {err}"
    except OSError as err:
        return None, f"unreadable: {err}"
    except Exception as err:  # noqa: BLE001 - untrusted files: whatever one raises must not stop the other 8,000
        log.debug("unexpected error decoding %s", item.path, exc_info=True)
        return None, f"error: {type(err).__name__}: {err}"
    return prepared.pixels, None


def chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def batches(items: Iterable[Item], batch_size: int, read: Callable[[Item], tuple[Optional[np.ndarray], Optional[str]]],
            workers: int, size: int) -> Iterator[Batch]:
    """Decode ``batch_size`` items at a time (``workers`` threads), yielding each batch before the next is read.

    This is what bounds memory: a generator, so the next batch is decoded
    only after the caller has predicted and written this one, and no more
    than ``batch_size`` decoded images (plus the ``workers`` full-size
    decodes in flight) ever exist at once.
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for chunk in chunks(items, batch_size):
            ok, pixels, failed = [], [], []
            for item, (image, reason) in zip(chunk, pool.map(read, chunk)):
                if image is None:
                    failed.append((item, reason or "unreadable"))
                else:
                    ok.append(item)
                    pixels.append(image)
            stacked = np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)
            del pixels
            yield Batch(ok, stacked, failed)


# ---------------------------------------------------------------- writing


class SubmissionWriter:
    """The submission CSV, a batch at a time, into ``<out>.partial``; renamed to ``out`` by ``finish``."""

    def __init__(self, out: Path, columns: Sequence[str]) -> None:
        self.out, self.columns = Path(out), list(columns)
        self.partial = self.out.with_name(self.out.name + PARTIAL_SUFFIX)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.file: TextIO = self.partial.open("w", newline="", encoding="utf-8")
        self.file.write(",".join(["image", *self.columns]) + "\n")
        self.file.flush()

    def write(self, image_ids: Sequence[str], values: np.ndarray) -> None:
        from dermascan.evaluation.scoring import submission

        if len(image_ids):
            # One string per batch, one write: a stop between batches leaves whole rows.
            self.file.write(submission(image_ids, values, self.columns).to_csv(
                header=False, index=False, float_format=FLOAT_FORMAT, lineterminator="\n"))
            self.file.flush()

    def finish(self) -> None:
        self.file.close()
        self.partial.replace(self.out)

    def abandon(self) -> None:
        """Close, leaving ``<out>.partial`` with the rows written so far."""
        self.file.close()


class FailureWriter:
    """``image, path, reason`` rows, flushed as they come: a report that survives an interrupted run."""

    def __init__(self, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.file = Path(path).open("w", newline="", encoding="utf-8")
        self.writer = csv.writer(self.file, lineterminator="\n")
        self.writer.writerow(FAILURE_COLUMNS)
        self.count = 0

    def write(self, failed: Iterable[tuple[Item, str]]) -> None:
        for item, reason in failed:
            self.writer.writerow([item.image_id, str(item.path) if item.path else "", " ".join(reason.split())])
            self.count += 1
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# ---------------------------------------------------------------- the run


class Progress:
    """A tqdm bar, or (progress=false, e.g. a batch job's log) a log line every ``every`` images with rate and ETA."""

    def __init__(self, total: int, bar: bool, every: int) -> None:
        from tqdm import tqdm

        self.total, self.every, self.done, self.next_log = total, every, 0, every
        self.started = time.perf_counter()
        self.bar = tqdm(total=total, desc="predict", unit="img", mininterval=1.0, disable=not bar)
        self.log = not bar

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        if self.log and (self.done >= self.next_log or self.done == self.total):
            elapsed = time.perf_counter() - self.started
            rate = self.done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            log.info("%d/%d images, %.1f img/s, ETA %.0f s", self.done, self.total, rate, eta)
            self.next_log = self.done + self.every

    def close(self) -> None:
        self.bar.close()


def predict_images(items: Sequence[Item], model: Model, out: Path, failures: Path, *, unk: bool, unk_scale: float,
                   batch_size: int, workers: int, limits: Limits, progress: bool = False, log_every: int = 1000,
                   skipped: int = 0) -> Summary:
    """Predict ``items`` with ``model`` into ``out`` and ``failures``; see the module docstring for the layout."""
    started = time.perf_counter()
    columns = [*CLASS_COLUMNS, UNK] if unk else list(CLASS_COLUMNS)
    try:
        writer, failed = SubmissionWriter(out, columns), FailureWriter(failures)
    except OSError as err:
        raise PredictError(f"cannot write the output: {err}") from None
    bar = Progress(len(items), progress, log_every)
    predicted = 0
    try:
        read = functools.partial(decode, size=model.size, method=model.method, limits=limits)
        for batch in batches(items, batch_size, read, workers, model.size):
            failed.write(batch.failed)
            if batch.items:
                ids, values, bad = predict_batch(batch, model, unk, unk_scale)
                writer.write(ids, values)
                failed.write(bad)
                predicted += len(ids)
            bar.update(len(batch.items) + len(batch.failed))
    except BaseException:
        writer.abandon()
        log.error("stopped after %d images: %s holds the rows written so far", predicted, writer.partial)
        raise
    finally:
        failed.close()
        bar.close()
    writer.finish()
    return Summary(predicted, failed.count, skipped, time.perf_counter() - started, Path(out), Path(failures))


def predict_batch(batch: Batch, model: Model, unk: bool, unk_scale: float) -> tuple[list[str], np.ndarray, list]:
    """(ids, submission rows, failures) of one decoded batch; rows with a non-finite output become failures."""
    probabilities, score = split_output(model.predict(batch.pixels), len(model.codes))
    if len(probabilities) != len(batch.items):
        raise PredictError(f"the model returned {len(probabilities)} rows for {len(batch.items)} images")
    if unk and (score is None or model.threshold is None):
        raise PredictError("the model returned no out_of_scope score: unk=true needs the gate's score (unk=false: "
                           "the 8-class layout)")
    unk_values = unk_probability(score, model.threshold, unk_scale) if unk else None
    values = submission_values(probabilities, model.codes, unk_values)
    finite = np.isfinite(values).all(axis=1)
    ids = [item.image_id for item, ok in zip(batch.items, finite) if ok]
    bad = [(item, "model_output: the model returned non-finite values") for item, ok in zip(batch.items, finite) if not ok]
    return ids, values[finite], bad


def predict(cfg: DictConfig) -> Summary:
    """``python -m dermascan.predict``: load the export, find the images, predict, report."""
    check(cfg)
    out = Path(cfg.out)
    failures = failures_path(out, cfg.failures)
    items, skipped = find_images(Path(cfg.images), Path(cfg.image_dir) if cfg.image_dir else None)
    log.info("%d images to predict from %s%s", len(items), cfg.images,
             f" ({skipped} other files skipped: not images)" if skipped else "")
    model = load_export(Path(cfg.export_dir), cfg.runtime, cfg.tflite, cfg.num_threads, cfg.unk)
    limits = Limits(cfg.max_file_bytes, cfg.max_pixels, cfg.draft_factor, cfg.max_jpeg_scans)
    summary = predict_images(items, model, out, failures, unk=cfg.unk, unk_scale=cfg.unk_scale,
                             batch_size=cfg.batch_size, workers=cfg.workers, limits=limits, progress=cfg.progress,
                             log_every=cfg.log_every, skipped=skipped)
    log.info("%d predicted, %d failed (%s), %d files skipped as not images; %.1f img/s; wrote %s",
             summary.predicted, summary.failed, summary.failures, summary.skipped, summary.rate, summary.out)
    if summary.predicted == 0:
        log.warning("no image could be predicted: %s has a header and no rows", summary.out)
    return summary


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def main(cfg: DictConfig) -> None:
    cli.run(predict, cfg, PredictConfig)


if __name__ == "__main__":
    main()
