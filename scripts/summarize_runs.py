"""One markdown row per finished training run: what each phase reached, and the test score.

    python scripts/summarize_runs.py runs/train/*          # or any run dirs, e.g. an ablation's

Reads each run dir's history.csv and summary.json (written by
``python -m dermascan.train``). Columns: the best val balanced accuracy of
phase 1 and of phase 2, the largest share of val predictions on one class
in phase 2 (1.0 = collapsed), the test balanced accuracy and mean AUC of the
best checkpoint, the training's warnings, and the wall-clock minutes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dermascan.artifacts import read_history


def row(run_dir: Path) -> str:
    history = read_history(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    by_phase = {int(p): rows for p, rows in history.groupby("phase")}

    def best(phase: int) -> str:
        return f"{by_phase[phase]['val_balanced_accuracy'].max():.3f}" if phase in by_phase else "-"

    share = "-"
    if 2 in by_phase and "val_largest_class_share" in by_phase[2]:
        share = f"{by_phase[2]['val_largest_class_share'].max():.2f}"
    test = summary.get("test") or {}
    auc = test.get("mean_auc")
    warnings = len((summary.get("training") or {}).get("warnings", []))
    return (f"| {run_dir.name} | {best(1)} | {best(2)} | {share} | {test.get('balanced_accuracy', float('nan')):.3f} | "
            f"{'n/a' if auc is None else f'{auc:.3f}'} | {warnings} | {summary.get('seconds', 0) / 60:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args()
    print("| run | phase 1 best val BA | phase 2 best val BA | phase 2 max val share on one class | "
          "test BA | test mean AUC | warnings | minutes |")
    print("|---|---|---|---|---|---|---|---|")
    for run_dir in args.run_dirs:
        if (run_dir / "summary.json").is_file():
            print(row(run_dir))


if __name__ == "__main__":
    main()
