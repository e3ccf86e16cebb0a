"""Load test of the prediction service on loopback: start-up time, latency, throughput, errors.

    # a 224-px model exported on the spot (random weights: speed only), TFLite fp32, the issue's targets
    python scripts/bench_serve.py --make-export /tmp/bench-export --alpha 0.35 --image-size 224 --phone

    # an existing export/ folder
    python scripts/bench_serve.py --export-dir runs/train/<ts>/export --clients 1 8 --duration 10 30

    # how much reduced-scale JPEG decoding moves pixels and probabilities (best run on a trained export)
    python scripts/bench_serve.py --export-dir runs/train/<ts>/export --draft-report

The server is ``python -m dermascan.serve`` in a subprocess on 127.0.0.1;
start-up is timed from launch to the first 200 from /health. Each scenario
drives N client threads (one keep-alive connection each) for T seconds or
--max-requests requests, whichever comes first, posting real 224-px JPEGs
from the ISIC sample (multipart, as the app sends them); --phone adds a
4032x3024 JPEG scenario (made from a sample, quality 90), with draft
decoding on and, for the ratio, off. Latency is client-side, end to end.
All traffic stays on loopback; the script stops itself (--timeout).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO.parent / "shared" / "data" / "isic-sample" / "images"

log = logging.getLogger("bench_serve")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_export(out: Path, image_size: int, alpha: float) -> None:
    """A MobileNetV2 model with random weights (for speed, not answers), exported with TFLite fp32."""
    from dermascan.config import RunConfig, compose
    from dermascan.export import export_model
    from dermascan.modeling.model import build_model

    started = time.perf_counter()
    overrides = ["run_dir=unused", "~experiment", f"model.image_size={image_size}", "model.weights=null", f"model.alpha={alpha}"]
    model, _ = build_model(compose("train", RunConfig, overrides).model)
    export_model(model, out, image_size=image_size, tflite=("fp32",), resize_method="bilinear", min_agreement=0.99,
                 latency_runs=20)
    log.info("exported a %d-px alpha %g model to %s in %.1f s", image_size, alpha, out, time.perf_counter() - started)


class Server:
    """``python -m dermascan.serve`` in a subprocess; ``startup_s`` is launch to the first healthy /health."""

    def __init__(self, export_dir: Path, runtime: str, tflite: str, extra: list[str], timeout: float) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.run_dir = tempfile.mkdtemp(prefix="bench-serve-")
        command = [
            sys.executable, "-m", "dermascan.serve", f"export_dir={export_dir}", f"runtime={runtime}", f"tflite={tflite}",
            "host=127.0.0.1", f"port={self.port}", "log_level=warning", "access_log=false", f"hydra.run.dir={self.run_dir}",
            *extra,
        ]
        self.log = open(Path(self.run_dir) / "server.log", "w")  # noqa: SIM115 - open for the server's life
        started = time.perf_counter()
        self.process = subprocess.Popen(command, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with {self.process.returncode}:\n"
                                 + (Path(self.run_dir) / "server.log").read_text()[-3000:])
            if time.perf_counter() - started > timeout:
                self.close()
                raise SystemExit(f"the server was not healthy after {timeout} s")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.01)
        self.startup_s = time.perf_counter() - started

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.log.close()


def phone_jpeg(path: Path, noise: float = 4.0, seed: int = 0) -> bytes:
    """A 4032x3024 JPEG (quality 90, 4:2:0, like a phone's) from a sample, with mild sensor-like noise."""
    from PIL import Image

    img = Image.open(path).convert("RGB").resize((4032, 3024), Image.Resampling.BICUBIC)
    pixels = np.asarray(img) + noise * np.random.default_rng(seed).standard_normal((3024, 4032, 3), np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def drive(url: str, uploads: list[bytes], clients: int, duration: float, max_requests: int) -> dict:
    """N client threads posting ``uploads`` round robin for ``duration`` s or ``max_requests`` requests in all."""
    import httpx

    latencies: list[float] = []
    server_ms: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(max_requests))
    deadline = time.perf_counter() + duration

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.perf_counter() < deadline:
                with lock:
                    number = next(counter, None)
                if number is None:
                    return
                data = uploads[(number + index) % len(uploads)]
                started = time.perf_counter()
                try:
                    response = http.post("/v1/predict", files={"file": ("photo.jpg", data, "image/jpeg")})
                    elapsed = time.perf_counter() - started
                    ok = response.status_code == 200
                    with lock:
                        if ok:
                            latencies.append(elapsed)
                            server_ms.append(response.json()["latency_ms"])
                        else:
                            errors.append(f"{response.status_code} {response.text[:200]}")
                except httpx.HTTPError as err:
                    with lock:
                        errors.append(f"{type(err).__name__}: {err}")

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration + 120)
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "clients": clients,
        "requests": len(latencies) + len(errors),
        "errors": len(errors),
        "error_examples": errors[:3],
        "seconds": round(wall, 2),
        "req_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
        "p95_ms": round(float(np.percentile(ms, 95)), 2) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
        "max_ms": round(float(ms.max()), 2) if len(ms) else None,
        "server_p50_ms": round(statistics.median(server_ms), 2) if server_ms else None,
    }


def table(rows: list[dict]) -> str:
    columns = ["scenario", "clients", "requests", "errors", "seconds", "req_per_s", "p50_ms", "p95_ms", "p99_ms", "max_ms",
               "server_p50_ms"]
    widths = {c: max(len(c), *(len(str(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.rjust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r.get(c)).rjust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def draft_report(export_dir: Path, runtime: str, tflite: str, count: int) -> None:
    """Pixels and probabilities: draft decoding and the resize cache's q95 round trip, each vs the full decode."""
    from PIL import Image

    from dermascan.runtime import load_predictor
    from dermascan.serve.images import prepare_image
    from dermascan.serve.model import load_model

    served = load_model(export_dir, runtime, tflite)
    predict = load_predictor(export_dir, runtime, tflite)
    size = served.image_size
    paths = sorted(SAMPLES.glob("*.jpg"))[100 : 100 + count]
    rows = {}
    full_pixels, uploads = [], []
    for i, path in enumerate(paths):
        for noise in (0.0, 8.0):
            data = phone_jpeg(path, noise, seed=i)
            uploads.append(data)
            full_pixels.append(prepare_image(data, size, served.resize_method, draft_factor=None).pixels)
    full = np.stack(full_pixels)
    reference = predict(full)["probabilities"]

    def q95(pixels: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=95, subsampling=0)
        return np.asarray(Image.open(buf).convert("RGB"))

    variants = {"q95 cache round trip": np.stack([q95(p) for p in full])}
    for factor in (1, 2, 4):
        variants[f"draft factor {factor}"] = np.stack(
            [prepare_image(d, size, served.resize_method, draft_factor=factor).pixels for d in uploads]
        )
    for name, pixels in variants.items():
        probabilities = predict(pixels)["probabilities"]
        pixel_diff = np.abs(pixels.astype(int) - full)
        prob_diff = np.abs(probabilities - reference)
        rows[name] = {
            "pixel_max": int(pixel_diff.max()), "pixel_mean": round(float(pixel_diff.mean()), 3),
            "prob_max": round(float(prob_diff.max()), 4), "prob_mean": round(float(prob_diff.mean()), 5),
            "top1_agreement": round(float(np.mean(probabilities.argmax(1) == reference.argmax(1))), 3),
        }
    print(f"\n{len(uploads)} phone-size JPEGs (4032x3024, q90) -> {size} px, each vs the full decode + resize:")
    print(f"{'':24}" + "".join(f"{k:>16}" for k in next(iter(rows.values()))))
    for name, row in rows.items():
        print(f"{name:24}" + "".join(f"{v:>16}" for v in row.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, help="an export/ folder")
    parser.add_argument("--make-export", type=Path, help="export a random-weight model here first (and use it)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--alpha", type=float, default=0.35)
    parser.add_argument("--runtime", default="tflite")
    parser.add_argument("--tflite", default="fp32")
    parser.add_argument("--num-threads", type=int, default=None, help="TFLite threads (default: the runtime's)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--duration", type=float, nargs="+", default=[10.0, 30.0],
                        help="seconds per scenario, one per --clients entry (the last repeats)")
    parser.add_argument("--max-requests", type=int, default=20_000, help="per scenario")
    parser.add_argument("--warmup", type=int, default=5, help="requests sent before each scenario, not counted")
    parser.add_argument("--phone", action="store_true", help="add a 4032x3024 JPEG scenario (draft on, then off)")
    parser.add_argument("--phone-requests", type=int, default=40)
    parser.add_argument("--draft-report", action="store_true", help="only measure draft decoding's effect, no server")
    parser.add_argument("--timeout", type=float, default=900, help="the whole run's limit in seconds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    if args.make_export:
        make_export(args.make_export, args.image_size, args.alpha)
        args.export_dir = args.make_export
    if not args.export_dir:
        parser.error("give --export-dir or --make-export")
    if args.draft_report:
        draft_report(args.export_dir, args.runtime, args.tflite, count=5)
        return
    jpegs = [p.read_bytes() for p in sorted(SAMPLES.glob("*.jpg"))]
    if not jpegs:
        raise SystemExit(f"no sample JPEGs in {SAMPLES}")
    timer = threading.Timer(args.timeout, lambda: os._exit(3))  # the hard bound on the whole run
    timer.daemon = True
    timer.start()

    extra = [f"num_threads={args.num_threads}"] if args.num_threads else []
    results: dict = {"export_dir": str(args.export_dir), "runtime": args.runtime, "tflite": args.tflite,
                     "cpus": os.cpu_count(), "scenarios": []}
    server = Server(args.export_dir, args.runtime, args.tflite, extra, timeout=120)
    try:
        results["startup_s"] = round(server.startup_s, 3)
        log.info("healthy after %.2f s", server.startup_s)
        for i, clients in enumerate(args.clients):
            duration = args.duration[min(i, len(args.duration) - 1)]
            drive(server.url, jpegs, 1, 60, args.warmup)
            row = drive(server.url, jpegs, clients, duration, args.max_requests)
            results["scenarios"].append({"scenario": "224px JPEG", **row})
            log.info("%d client(s): %s", clients, row)
        if args.phone:
            phones = [phone_jpeg(p, seed=i) for i, p in enumerate(sorted(SAMPLES.glob("*.jpg"))[100:104])]
            results["phone_jpeg_bytes"] = [len(p) for p in phones]
            drive(server.url, phones, 1, 60, 2)
            row = drive(server.url, phones, 1, 600, args.phone_requests)
            results["scenarios"].append({"scenario": "4032x3024 JPEG, draft", **row})
    finally:
        server.close()
    if args.phone:
        server = Server(args.export_dir, args.runtime, args.tflite, [*extra, "draft_factor=0"], timeout=120)
        try:
            drive(server.url, phones, 1, 60, 2)
            row = drive(server.url, phones, 1, 600, args.phone_requests)
            results["scenarios"].append({"scenario": "4032x3024 JPEG, full decode", **row})
        finally:
            server.close()
    print(f"\nserve benchmark: {args.export_dir} ({args.runtime}{' ' + args.tflite if args.runtime == 'tflite' else ''}), "
          f"{os.cpu_count()} CPUs, start-up to healthy /health {results['startup_s']:.2f} s")
    print(table(results["scenarios"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
