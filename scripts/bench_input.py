"""Input-pipeline throughput: legacy ImageDataGenerator vs the fast engine vs decode only.

In one process, on the same images (the 240 real sample JPEGs, resized once
into a resize cache at 224 px), with the default augmentation
(configs/augment/default.yaml), it measures images per second for:

  (a) legacy  ImageDataGenerator.flow_from_dataframe with the same parameters
  (b) fast    the tf.data engine (parallel decode, fused affine warp, prefetch)
  (c) decode  tf.data decode and resize only: the upper bound

Each pipeline gets one warm-up pass, then --runs timed passes of --images
images each; the table shows the median and the ratios.

    python scripts/bench_input.py [--images 2000] [--runs 5] [--batch 32]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import tensorflow as tf
from omegaconf import OmegaConf

from dermascan.modeling.augment import AugmentParams
from dermascan.modeling.inputs import PipelineSpec, decode, make_inputs

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_input")


def sample_frame(images_dir: Path, ground_truth: Path) -> pd.DataFrame:
    paths = sorted(images_dir.glob("*.jpg"))
    truth = pd.read_csv(ground_truth).set_index("image")
    ids = [p.stem for p in paths]
    labels = truth.loc[ids, ["AK", "BCC", "BKL", "DF", "MEL", "NV", "SCC", "VASC"]].idxmax(axis=1)
    return pd.DataFrame({"image_id": ids, "path": [str(p) for p in paths], "label": labels.to_numpy()})


def timed(consume: Callable[[int], int], images: int, runs: int) -> list[float]:
    consume(images)  # warm-up: graph tracing, thread pools, page cache
    rates = []
    for _ in range(runs):
        started = time.perf_counter()
        seen = consume(images)
        rates.append(seen / (time.perf_counter() - started))
    return rates


def consume_dataset(ds: tf.data.Dataset) -> Callable[[int], int]:
    iterator = iter(ds.repeat())

    def run(images: int) -> int:
        seen = 0
        while seen < images:
            seen += int(next(iterator)[0].shape[0])
        return seen

    return run


def consume_sequence(seq) -> Callable[[int], int]:
    state = {"i": 0}

    def run(images: int) -> int:
        seen = 0
        while seen < images:
            x, _ = seq[state["i"] % len(seq)]
            state["i"] += 1
            seen += len(x)
        return seen

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-dir", type=Path, default=REPO.parent / "shared/data/isic-sample/images")
    parser.add_argument("--ground-truth", type=Path, default=REPO.parent / "shared/data/isic/ISIC_2019_Training_GroundTruth.csv")
    parser.add_argument("--images", type=int, default=2000, help="images per timed run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--augment", type=Path, default=REPO / "configs/augment/default.yaml")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    frame = sample_frame(args.images_dir, args.ground_truth)
    augment = OmegaConf.to_container(OmegaConf.load(args.augment))
    params = AugmentParams.from_config(augment)
    spec = PipelineSpec(image_size=args.size, batch_size=args.batch, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        cache = {"dir": tmp, "size": args.size, "method": "bilinear", "quality": 95, "workers": 2}
        legacy = make_inputs(frame, PipelineSpec(**{**spec.__dict__, "engine": "legacy"}), params, True, cache)
        fast = make_inputs(frame, spec, params, True, cache)
        cached = sorted(str(p) for p in Path(tmp).rglob("*.jpg"))
        decode_only = (
            tf.data.Dataset.from_tensor_slices(cached)
            .map(lambda p: tf.image.resize(decode(p, args.size), [args.size, args.size]), num_parallel_calls=tf.data.AUTOTUNE)
            .map(lambda x: (x, 0))
            .batch(args.batch)
            .prefetch(tf.data.AUTOTUNE)
        )
        results = {
            "(a) legacy IDG": timed(consume_sequence(legacy), args.images, args.runs),
            "(b) fast": timed(consume_dataset(fast), args.images, args.runs),
            "(c) decode+resize only": timed(consume_dataset(decode_only), args.images, args.runs),
        }
    medians = {name: statistics.median(rates) for name, rates in results.items()}
    lines = [f"{'pipeline':<24}{'img/s (median)':>16}   runs", "-" * 60]
    for name, rates in results.items():
        lines.append(f"{name:<24}{medians[name]:>16.0f}   " + " ".join(f"{r:.0f}" for r in rates))
    a, b, c = medians.values()
    lines.append(f"fast / legacy = {b / a:.2f}x   (target >= 3x)")
    lines.append(f"fast / decode-only bound = {b / c:.0%}   (target >= 25%)")
    log.info(
        "%d images of %d px, batch %d, augmentation %s\n%s",
        len(frame), args.size, args.batch, args.augment.name, "\n".join(lines),
    )


if __name__ == "__main__":
    main()
