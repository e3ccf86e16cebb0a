"""Training throughput of both phases, fed by the input pipeline vs in-memory tensors.

On the real sample JPEGs (resize cache, fast engine, default augmentation),
MobileNetV2 (alpha 1.0 by default) at 224 px, batch 32, random init (the
throughput does not depend on the weights): images per second of

  phase 1  head only, backbone frozen
  phase 2  whole network

each fed (a) by the tf.data pipeline from the resize cache and (b) by one
in-memory batch repeated (the model-only bound). Warm-up steps are excluded.

    python scripts/bench_train.py [--steps 20] [--size 224] [--alpha 1.0] [--precision auto]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import keras
import tensorflow as tf

from dermascan.config import RunConfig, compose
from dermascan.modeling.augment import AugmentParams
from dermascan.modeling.fit import compile_model
from dermascan.modeling.inputs import PipelineSpec, make_inputs
from dermascan.modeling.model import build_model, unfreeze

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench_train")


def rate(model: keras.Model, data: tf.data.Dataset, steps: int, batch: int, warmup: int = 3) -> float:
    model.fit(data, steps_per_epoch=warmup, epochs=1, verbose=0)
    started = time.perf_counter()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--precision", default="auto", help="auto, float32, mixed_float16, mixed_bfloat16")
    parser.add_argument("--jit", action="store_true", help="XLA-compile the train step")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from bench_input import sample_frame  # same folder

    precision = args.precision
    if precision == "auto":
        precision = "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"
    keras.mixed_precision.set_global_policy(precision)
    frame = sample_frame(REPO.parent / "shared/data/isic-sample/images", REPO.parent / "shared/data/isic/ISIC_2019_Training_GroundTruth.csv")
    cfg = compose("train", RunConfig, ["run_dir=unused", "~experiment", "augment=default", f"model.image_size={args.size}",
                                       "model.weights=null", f"model.alpha={args.alpha}", "model.freeze_bn=true"])
    params = AugmentParams.from_config(cfg.augment)
    spec = PipelineSpec(image_size=args.size, batch_size=args.batch, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        cache = {"dir": tmp, "size": args.size, "method": "bilinear", "quality": 95, "workers": 4}
        pipeline = make_inputs(frame, spec, params, training=True, cache=cache)
        images, labels = next(iter(pipeline))
        in_memory = tf.data.Dataset.from_tensors((images, labels)).repeat()

        model, base = build_model(cfg.model)
        rows = []
        compile_model(model, 1e-3, cfg.train, args.jit)
        rows.append(("phase 1 (frozen backbone)", rate(model, pipeline, args.steps, args.batch),
                     rate(model, in_memory, args.steps, args.batch)))
        unfreeze(base, None, freeze_bn=True)
        compile_model(model, 1e-4, cfg.train, args.jit)
        rows.append(("phase 2 (whole network)", rate(model, pipeline, args.steps, args.batch),
                     rate(model, in_memory, args.steps, args.batch)))
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    lines = [f"{'':<28}{'pipeline img/s':>16}{'in-memory img/s':>17}{'pipeline/bound':>16}"]
    for name, fed, bound in rows:
        lines.append(f"{name:<28}{fed:>16.1f}{bound:>17.1f}{fed / bound:>15.0%}")
    log.info(
        "MobileNetV2 alpha %.2f at %d px, batch %d, %s on %s, %d timed steps\n%s",
        args.alpha, args.size, args.batch, precision, device, args.steps, "\n".join(lines),
    )


if __name__ == "__main__":
    main()
