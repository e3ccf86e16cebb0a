"""Time ingestion of the full ISIC 2018 + 2019 union (27,036 ids) with header checks.

The CSVs are the real, complete official files; the 27k image files are hard
links to the 240 real sample JPEGs (see dermascan.data.layout), so every
image is opened and checked as on the real download.

    python scripts/bench_ingest.py [--csvs ../shared/data/isic] [--jpegs ../shared/data/isic-sample/images]
                                   [--verify header|decode] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from dermascan.config import IngestConfig, config_dir, validate
from dermascan.data.layout import stand_in_layout
from dermascan.ingest import ingest

log = logging.getLogger("bench_ingest")
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csvs", type=Path, default=REPO.parent / "shared" / "data" / "isic")
    parser.add_argument("--jpegs", type=Path, default=REPO.parent / "shared" / "data" / "isic-sample" / "images")
    parser.add_argument("--verify", choices=["header", "decode"], default="header")
    parser.add_argument("--akiec", choices=["drop", "ak"], default="drop")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        root = stand_in_layout(Path(tmp) / "raw", args.csvs, sorted(args.jpegs.glob("*.jpg")))
        log.info("laid out the stand-in dataset in %.1f s", time.perf_counter() - started)
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(
                "ingest",
                overrides=[
                    "data=isic",
                    f"data.root={root}",
                    f"data.processed_dir={tmp}/processed",
                    f"data.verify={args.verify}",
                    f"data.akiec={args.akiec}",
                ],
            )
        cfg = validate(cfg, IngestConfig)
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            result = ingest(cfg)
            times.append(time.perf_counter() - started)
        ids = len(result.manifest) + result.summary["excluded"]["total"]
    log.info(
        "ingest of %d ids -> %d images (verify=%s): median %.1f s over %d runs (%s); target < 60 s",
        ids,
        len(result.manifest),
        args.verify,
        statistics.median(times),
        args.repeats,
        ", ".join(f"{t:.1f}" for t in times),
    )


if __name__ == "__main__":
    main()
