"""notebooks/error_analysis.ipynb: committed without outputs, and runs top to bottom on the debug run.

The notebook runs in a kernel of this very interpreter (the venv's python,
through a kernelspec written into a temporary JUPYTER_PATH), with no user
or system Jupyter state: what CI has is what this test needs.

To strip the outputs of a notebook saved from Jupyter:

    .venv/bin/python tests/test_notebook.py
"""

from __future__ import annotations

import ast
import base64
import io
import json
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "error_analysis.ipynb"
PARAMETERS = {"run_dir": None, "mlflow_run_id": None, "tracking_uri": None, "n_worst": 12, "gradcam_images": 4,
              "n_nearest": 8}
KERNEL = "dermascan-nbtest"


def strip(path: Path = NOTEBOOK) -> None:
    """Remove every output, execution count and execution timing from the notebook, in place."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)


def tagged(nb: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    dirty = [c.id for c in code if c.outputs or c.execution_count is not None or "execution" in c.metadata]
    assert not dirty, f"cells {dirty} hold outputs: strip them with `.venv/bin/python tests/test_notebook.py`"
    assert "widgets" not in nb.metadata
    assert not [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]


def test_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = tagged(nb, "parameters")
    assigned = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(cell.source).body
        if isinstance(node, ast.Assign)
    }
    assert {k: assigned.get(k, "missing") for k in PARAMETERS} == PARAMETERS
    assert nb.cells.index(cell) < nb.cells.index(tagged(nb, "load"))


def inject(nb: nbformat.NotebookNode, **parameters) -> nbformat.NotebookNode:
    """Add a cell after the parameters cell that overrides them, as papermill does."""
    source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(nb.cells.index(tagged(nb, "parameters")) + 1, cell)
    return nb


@pytest.fixture
def isolated_kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec for this interpreter in a fresh JUPYTER_PATH, and no user Jupyter/IPython state."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dermascan (test)",
        "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    return KERNEL


def outputs(cell: nbformat.NotebookNode, mime: str) -> list:
    return [o["data"][mime] for o in cell.outputs if "data" in o and mime in o["data"]]


def text(cell: nbformat.NotebookNode) -> str:
    parts = [o.get("text", "") for o in cell.outputs if o["output_type"] == "stream" and o.get("name") == "stdout"]
    return "".join(parts) + "".join(outputs(cell, "text/plain"))


def png_size(data: str) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(data))).size


def test_notebook_runs_on_the_debug_run(debug_run, isolated_kernel):
    from nbclient import NotebookClient

    from dermascan.evaluation import analysis

    cfg = debug_run[0]
    nb = inject(nbformat.read(NOTEBOOK, as_version=4), run_dir=str(cfg.run_dir), n_worst=6, gradcam_images=2,
                n_nearest=3)
    client = NotebookClient(
        nb, kernel_name=isolated_kernel, timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    assert not [o for c in code for o in c.outputs if o["output_type"] == "error"]

    expected = analysis.load(run_dir=cfg.run_dir)
    assert str(cfg.run_dir) in text(tagged(nb, "load"))

    headline = text(tagged(nb, "headline"))
    assert headline.index("balanced_accuracy") < headline.index("top1_accuracy") < headline.index("mean_auc")

    (confusion,) = outputs(tagged(nb, "confusion-matrix"), "image/png")
    assert png_size(confusion)[0] > 500

    worst = tagged(nb, "worst-errors")
    errors = analysis.worst_errors(expected.table, 6)
    assert not errors.empty  # the debug model is far from perfect
    assert all(image_id in text(worst) for image_id in errors["image_id"])
    assert len(outputs(worst, "image/png")) == 1

    breakdowns = tagged(nb, "breakdowns")
    assert len(outputs(breakdowns, "image/png")) == 4
    headings = "".join(outputs(breakdowns, "text/markdown"))
    for heading in ("source release", "anatomical site", "age band", "sex"):
        assert f"By {heading}" in headings
    tables = text(breakdowns)
    for by in analysis.BREAKDOWNS:
        assert all(str(group) in tables for group in analysis.breakdown(expected.table, by).index), by

    section = tagged(nb, "referral-subgroups")
    markdown = "".join(outputs(section, "text/markdown"))
    referral = expected.evaluation["referral"]
    assert "threshold" in referral, referral  # the debug run's val split holds images needing referral
    assert f"≥ {referral['threshold']:.4f}" in markdown and referral["verdict"][1:] in markdown
    rates = text(section)
    assert all(rate in rates for rate in ("sensitivity", "specificity", "ppv", "npv", "referrals_per_100"))
    for dimension, groups in expected.evaluation["subgroups"]["dimensions"].items():
        assert f"Subgroups by {dimension.replace('_', ' ')}" in markdown
        assert all(str(group) in rates for group in groups), dimension
    assert len(outputs(section, "image/png")) == 1

    gate = expected.evaluation["out_of_scope"]
    assert "threshold" in gate, gate
    section = tagged(nb, "out-of-scope")
    markdown = "".join(outputs(section, "text/markdown"))
    assert f"> {gate['threshold']:.4f}" in markdown and f"{gate['test_rejected']:.1%} of the test images" in markdown
    assert "The test images (lesions) nearest the threshold" in markdown
    assert "The out-of-scope images nearest the threshold" in markdown
    assert len(outputs(section, "image/png")) == 3  # the histograms, then one gallery per side
    inside, outside = analysis.nearest_threshold(analysis.out_of_scope_scores(expected), gate["threshold"], 3, "test")
    shown = text(section)
    assert len(inside) == len(outside) == 3
    assert all(str(image) in shown for image in [*inside["image"], *outside["image"]])
    assert all(name in shown for name in ("skimage", "synthetic", "corrupted lesion"))

    gradcam = tagged(nb, "gradcam")
    assert len(outputs(gradcam, "image/png")) == 1
    assert all(image_id in text(gradcam) for image_id in errors["image_id"][:2])


if __name__ == "__main__":
    strip()
    print(f"stripped {NOTEBOOK}")
