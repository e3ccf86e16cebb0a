"""Issue 12 items 1-4, measured: scan bombs, memory per upload, aborted uploads, slow connections.

    python scripts/bench_hardening.py all              # this tree
    PYTHONPATH=/tmp/before/src python scripts/bench_hardening.py all   # another tree (git worktree add /tmp/before HEAD)

    bomb     latency of a normal 224-px JPEG while two progressive-JPEG scan bombs (7000x7000, last scan x1000) are posted
    memory   peak memory (VmHWM, a fresh subprocess per image) of prepare_image on 7000x7000 16-bit PNG, 32-bit and
             float TIFF, lossless WebP, RGBA PNG
    abort    tracebacks logged when a client sends Content-Length: 1000000, 10 bytes, then closes
    slow     how long the server keeps a connection open that sent nothing, half a header, or half a body

The server is uvicorn on loopback in this process, serving create_app with a stub model (no TensorFlow):
only the upload handling is measured. Every wait is capped (--cap seconds).
"""

from __future__ import annotations

import argparse
import io
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "isic-sample" / "images" / "ISIC_0024370.jpg"
SIDE = 7000
SOS = b"\xff\xda"


def scan_bomb(side: int = SIDE, repeats: int = 1000) -> bytes:
    """A progressive JPEG whose last (smallest) scan is repeated ``repeats`` times before EOI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (180, 120, 100)).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    last = data.rindex(b"\xff\xda")
    return data[:-2] + data[last:-2] * repeats + b"\xff\xd9"


def stub_app(**kwargs):
    """create_app with a stub model: 8 classes, 224 px, constant probabilities."""
    import dermascan.serve.app as app_module

    classes = [{"index": i, "code": f"C{i}", "name": f"c{i}", "description": "d", "category": "benign"} for i in range(8)]
    stub = SimpleNamespace(image_size=224, resize_method="bilinear", classes=classes, disclaimer="not a diagnosis",
                           model_version="stub", runtime="stub", files_verified=0,
                           probabilities=lambda pixels: np.full(8, 1 / 8))
    app_module.load_model = lambda *a, **k: stub
    return app_module.create_app("unused", **kwargs)


class Server:
    def __init__(self, app, **config) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="info", lifespan="off",
                                                    log_config=None, **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def post(port: int, data: bytes, timeout: float) -> tuple[int, float]:
    import httpx

    started = time.perf_counter()
    try:
        response = httpx.post(f"http://127.0.0.1:{port}/v1/predict", content=data, headers={"content-type": "image/jpeg"},
                              timeout=timeout)
        return response.status_code, time.perf_counter() - started
    except httpx.TimeoutException:
        return 0, time.perf_counter() - started


def bench_bomb(cap: float) -> None:
    server = Server(stub_app())
    bomb, normal = scan_bomb(), SAMPLE.read_bytes()
    results = []
    bombs = [threading.Thread(target=lambda: results.append(post(server.port, bomb, cap))) for _ in range(2)]
    for thread in bombs:
        thread.start()
    time.sleep(0.5)
    status, seconds = post(server.port, normal, cap)
    print(f"bomb: {len(bomb)} bytes, {bomb.count(SOS)} scans; normal request with two bombs in flight: "
          f"status {status or 'timeout'} after {seconds:.2f} s (cap {cap:g} s)")
    for thread in bombs:
        thread.join(cap)
    print(f"bomb: the bombs were answered {sorted(results)}")
    server.close()


def memory_images() -> dict[str, bytes]:
    from PIL import Image

    def encode(img, fmt, **params):
        buf = io.BytesIO()
        img.save(buf, fmt, **params)
        return buf.getvalue()

    ramp = np.tile(np.arange(SIDE, dtype=np.uint16) * 9, (SIDE, 1))
    return {
        "png16": encode(Image.fromarray(ramp), "PNG"),
        "tiff32": encode(Image.fromarray(ramp.astype(np.int32) * 3, "I"), "TIFF", compression="tiff_deflate"),
        "tiff_float": encode(Image.fromarray(ramp.astype(np.float32) / 65535, "F"), "TIFF", compression="tiff_deflate"),
        "webp": encode(Image.new("RGB", (SIDE, SIDE), (200, 100, 50)), "WEBP", lossless=True),
        "png_rgba": encode(Image.new("RGBA", (SIDE, SIDE), (200, 100, 50, 128)), "PNG"),
    }


PEAK = """
import sys
from pathlib import Path
def hwm():
    return next(int(l.split()[1]) for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')) / 1024
data = Path(sys.argv[1]).read_bytes()
from dermascan.serve.images import prepare_image
prepare_image(b'', 224) if False else None
idle = hwm()
try:
    prepare_image(data, 224, max_pixels=int(sys.argv[2]))
    outcome = 'ok'
except Exception as err:
    outcome = f'{type(err).__name__}'
print(f'{hwm() - idle:.0f} {outcome}')
"""


def bench_memory(tmp: Path) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    for name, data in memory_images().items():
        path = tmp / name
        path.write_bytes(data)
        out = subprocess.run([sys.executable, "-c", PEAK, str(path), "50000000"], capture_output=True, text=True, check=False)
        print(f"memory: {name:10s} {len(data) / 1024:8.0f} KB  peak above idle (MB), outcome: "
              f"{out.stdout.strip() or out.stderr.strip()[-300:]}  (max_pixels x 4 = {SIDE * SIDE * 4 / 2**20:.0f} MB "
              f"for this image)")


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def bench_abort() -> None:
    captured = Captured()
    logging.getLogger().addHandler(captured)
    logging.getLogger().setLevel(logging.DEBUG)
    server = Server(stub_app())
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 1000000\r\n\r\n"
                         + b"\xff" * 10)
            time.sleep(0.2)
    time.sleep(1.0)
    server.close()
    tracebacks = [r for r in captured.records if r.exc_info]
    print(f"abort: 3 aborted uploads -> {len(tracebacks)} tracebacks logged, {sum(r.levelno >= logging.ERROR for r in captured.records)} "
          f"error records; messages: {sorted({r.getMessage()[:60] for r in captured.records if r.levelno >= logging.INFO})}")


def open_for(port: int, payload: bytes, cap: float) -> float:
    """Seconds until the server closes a connection that sent ``payload`` and then waits (cap: never closed)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(cap)
        started = time.perf_counter()
        if payload:
            sock.sendall(payload)
        try:
            while sock.recv(65536):
                pass
        except TimeoutError:
            return float("inf")
        except OSError:
            pass
        return time.perf_counter() - started


def bench_slow(cap: float) -> None:
    try:  # the serve.yaml defaults, where this tree has them
        from dermascan.config import ServeConfig, compose
        from dermascan.serve.__main__ import server_options

        cfg = compose("serve", ServeConfig, ["export_dir=unused"])
        options = server_options(cfg.header_timeout, cfg.timeout_keep_alive, cfg.limit_concurrency)
    except (ImportError, AttributeError):
        options = {}
    print(f"slow: server options {options}")
    server = Server(stub_app(), **options)
    cases = {
        "nothing": b"",
        "half a header": b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Ty",
        "half a body": b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 1000\r\n\r\n"
                       + b"\xff" * 500,
    }
    results: dict[str, float] = {}
    threads = [threading.Thread(target=lambda k=k, p=p: results.__setitem__(k, open_for(server.port, p, cap)))
               for k, p in cases.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in cases:
        print(f"slow: a connection that sent {name}: closed after {results[name]:.1f} s (inf: still open at the cap, {cap:g} s)")
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["bomb", "memory", "abort", "slow", "all"])
    parser.add_argument("--cap", type=float, default=70.0, help="longest wait for any one measurement, seconds")
    parser.add_argument("--tmp", type=Path, default=Path("/tmp/bench_hardening"))
    args = parser.parse_args()
    import dermascan

    print(f"dermascan from {Path(dermascan.__file__).parent}")
    if args.what in ("bomb", "all"):
        bench_bomb(args.cap)
    if args.what in ("memory", "all"):
        bench_memory(args.tmp)
    if args.what in ("abort", "all"):
        bench_abort()
    if args.what in ("slow", "all"):
        bench_slow(args.cap)


if __name__ == "__main__":
    main()
