"""Shared fixtures: composed configs, the real ISIC CSVs and sample JPEGs."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
from omegaconf import DictConfig, OmegaConf

from dermascan import config
from dermascan.config import RunConfig
from dermascan.data.isic import METADATA_2019, RELEASES

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
ISIC_CSVS = SHARED / "isic"
SAMPLE_IMAGES = SHARED / "isic-sample" / "images"


# A test that uses one of these fixtures (directly or through another) trains or
# exports a model first: it belongs to the integration tier.
INTEGRATION_FIXTURES = frozenset(
    {"debug_run", "exported", "exported_gated", "mlflow_server", "synthesized", "isolated_kernel"}
)
INTEGRATION_MODULES = frozenset({"test_main_job", "test_notebook", "test_packaging", "test_infra", "test_real_recipe"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the integration tier: ``python -m pytest -m "not integration"`` is the unit tier (about a minute on 2 cores).

    Slow tests are integration tests too, so that ``-m "not integration"``
    (which replaces the default ``-m 'not slow'``) still leaves them out.
    """
    for item in items:
        heavy = (
            item.get_closest_marker("slow") is not None
            or INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ()))
            or item.module.__name__.rsplit(".", 1)[-1] in INTEGRATION_MODULES
        )
        if heavy:
            item.add_marker(pytest.mark.integration)


def compose_config(name: str, overrides: list[str], schema: type) -> DictConfig:
    """Compose ``configs/<name>.yaml`` with overrides and validate it, as the entry points do."""
    return config.compose(name, schema, overrides)


def model_config(units=None, dropout=None, **values) -> DictConfig:
    """The ``model`` group from the YAML (``configs/model/mobilenet_v2.yaml``) with ``values`` over it.

    ``units`` and ``dropout`` set the head's; e.g. ``model_config(image_size=32, weights=None, units=[8], dropout=[0.1])``.
    """
    head = {k: v for k, v in (("units", units), ("dropout", dropout)) if v is not None}
    base = compose_config("train", ["run_dir=/r", "~experiment"], RunConfig).model
    return OmegaConf.merge(base, values, {"head": head} if head else {})


@pytest.fixture(scope="session")
def isic_csvs() -> Path:
    if not (ISIC_CSVS / "ISIC_2019_Training_GroundTruth.csv").is_file():
        pytest.skip(f"real ISIC CSVs not found at {ISIC_CSVS}")
    return ISIC_CSVS


@pytest.fixture(scope="session")
def sample_jpegs() -> list[Path]:
    jpegs = sorted(SAMPLE_IMAGES.glob("*.jpg"))
    if len(jpegs) < 240:
        pytest.skip(f"the 240 real sample JPEGs were not found at {SAMPLE_IMAGES}")
    return jpegs


@pytest.fixture(scope="session")
def sample_labels(isic_csvs: Path, sample_jpegs: list[Path]) -> pd.DataFrame:
    """ISIC 2019 ground-truth rows of the 240 sample images."""
    gt = pd.read_csv(isic_csvs / "ISIC_2019_Training_GroundTruth.csv")
    ids = {p.stem for p in sample_jpegs}
    return gt[gt["image"].isin(ids)].reset_index(drop=True)


@pytest.fixture
def small_root(tmp_path, isic_csvs, sample_jpegs, sample_labels) -> Path:
    """The 240 real sample images in the ISIC 2019 layout, with their real CSV rows."""
    root = tmp_path / "raw"
    (root / RELEASES["isic2019_train"].input_dir).mkdir(parents=True)
    for jpeg in sample_jpegs:
        shutil.copyfile(jpeg, root / RELEASES["isic2019_train"].input_dir / jpeg.name)
    sample_labels.to_csv(root / RELEASES["isic2019_train"].ground_truth, index=False)
    meta = pd.read_csv(isic_csvs / METADATA_2019)
    meta[meta["image"].isin(sample_labels["image"])].to_csv(root / METADATA_2019, index=False)
    return root


def debug_overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "debug=default",
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.runs_dir={tmp_path / 'runs'}",
        f"run_dir={tmp_path / 'runs' / 'train' / 'run1'}",
        # Export (SavedModel + TFLite, ~30 s) only where a test asks for it.
        "export.enabled=false",
        *extra,
    ]


def debug_config(tmp_path: Path, *extra: str) -> DictConfig:
    return compose_config("train", debug_overrides(tmp_path, *extra), RunConfig)


@pytest.fixture(scope="session")
def debug_run(tmp_path_factory):
    """One finished debug training run (2 + 2 epochs), shared by the train, evaluate and export tests."""
    from dermascan.train import train

    tmp_path = tmp_path_factory.mktemp("debug_run")
    cfg = debug_config(tmp_path, "train.phase1.epochs=2", "train.phase2.epochs=2", "export.enabled=true")
    metrics, artifacts = train(cfg)
    return cfg, metrics, artifacts


EXPORT_SIZE = 64


@pytest.fixture(scope="session")
def sample_pixels(sample_jpegs, sample_labels):
    """The 240 real sample JPEGs as a 64-px model sees them (the training resize), with their label indices."""
    import numpy as np

    from dermascan.classes import CODES
    from dermascan.data.cache import resize_image

    images = np.stack([np.asarray(resize_image(p, EXPORT_SIZE, "bilinear")) for p in sample_jpegs])
    labels = sample_labels.set_index("image").loc[[p.stem for p in sample_jpegs], list(CODES)].to_numpy().argmax(1)
    return images, labels


def with_real_statistics(model, base, images) -> None:
    """Set every BatchNorm's statistics from one batch of real images (momentum 0), then refreeze the backbone.

    Random weights with default statistics give the same output for every
    image; with these, the output depends on the input, so agreement and
    equality checks mean something.
    """
    import keras

    base.trainable = True
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(images[:32].astype("float32"), training=True)
    base.trainable = False


@pytest.fixture(scope="session")
def exported(sample_pixels, tmp_path_factory):
    """A 64-px model exported in every format, parity measured on the real sample images; shared by export and serve tests."""
    import keras

    from dermascan.classes import INDEX
    from dermascan.export import export_model
    from dermascan.modeling.model import build_model, inference_model
    from dermascan.runtime import TFLITE_KINDS

    images, labels = sample_pixels
    keras.utils.set_random_seed(0)
    model, base = build_model(model_config(image_size=EXPORT_SIZE, weights=None, alpha=0.35, units=[16, 8], dropout=[0.3, 0.3],
                              bn_momentum=0.0))
    with_real_statistics(model, base, images)
    out_dir = tmp_path_factory.mktemp("export") / "export"
    # A referral operating point at the median score of the samples, so that about half of them are referred.
    served = inference_model(model, 1.7).predict(images.astype("float32"), verbose=0)
    codes = ["AK", "BCC", "MEL", "SCC"]
    threshold = float(np.median(served[:, [INDEX[code] for code in codes]].sum(axis=1)))
    referral = {"classes": codes, "threshold": threshold, "target_sensitivity": 0.95, "chosen_on": "test fixture",
                "val": {"sensitivity": 0.9, "specificity": 0.5, "n": 100, "n_positive": 40}}
    report = export_model(
        model, out_dir, image_size=EXPORT_SIZE, tflite=TFLITE_KINDS, resize_method="bilinear", temperature=1.7,
        parity_images=images, parity_labels=labels, representative=images[::4], referral=referral,
        min_agreement=0.0, latency_runs=10, card="# tiny test model\n\nNot trained; not a diagnosis.\n",
    )
    return model, out_dir, report


def synthetic_outside(size: int, n: int = 12) -> "np.ndarray":
    """Images that are not dermoscopy: flat colours and uniform noise, uint8 [n, size, size, 3], seeded."""
    rng = np.random.default_rng(7)
    colours = [(0, 0, 0), (255, 255, 255), (128, 128, 128), (255, 0, 0), (0, 90, 255), (30, 160, 60)]
    flat = [np.full((size, size, 3), colour, np.uint8) for colour in colours]
    noise = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n - len(flat))]
    return np.stack(flat + noise)


@pytest.fixture(scope="session")
def exported_gated(sample_pixels, tmp_path_factory):
    """The tiny model with its out-of-scope gate, fitted on half of the real sample images and thresholded on
    the other half, exported as fp32 and int8_full TFLite; the gate's decision is checked on synthetic images too."""
    import keras

    from dermascan.export import export_model
    from dermascan.modeling.model import build_model
    from dermascan.modeling.ood import FEATURES_LAYER, fit_gate

    images, labels = sample_pixels
    keras.utils.set_random_seed(0)
    model, base = build_model(model_config(image_size=EXPORT_SIZE, weights=None, alpha=0.35, units=[16, 8], dropout=[0.3, 0.3],
                              bn_momentum=0.0))
    with_real_statistics(model, base, images)
    features = keras.Model(model.inputs, model.get_layer(FEATURES_LAYER).output).predict(
        images.astype("float32"), verbose=0)
    gate = fit_gate(features[::2], labels[::2], features[1::2], dims=32, keep=0.95)
    scores = gate.score(features)
    out_dir = tmp_path_factory.mktemp("export_gated") / "export"
    report = export_model(
        model, out_dir, image_size=EXPORT_SIZE, tflite=["fp32", "int8_full"], resize_method="bilinear",
        # as export_run calibrates: with the lesions the gate rejects, so int8's score range reaches past the threshold
        parity_images=images, parity_labels=labels, gate=gate,
        representative=np.concatenate([images[::4], images[scores > gate.threshold]]),
        outside_images=synthetic_outside(EXPORT_SIZE), out_of_scope={"val_rejected": 0.05, "sets": {}},
        int8_float_ops=["DEPTHWISE_CONV_2D"], int8_float_layers=["out_of_scope"],  # configs/export's defaults
        min_agreement=0.0, min_decision_agreement=0.99, required=[],
        card="# tiny gated test model\n\nNot trained; not a diagnosis.\n",
    )
    # The sample lesion the gate scores highest: out of scope for this untrained backbone, whose features put
    # flat colours among the lesions (the real-model separation is the slow test in test_real_recipe.py).
    assert scores.max() > gate.threshold * 1.05, (scores.max(), gate.threshold)
    return model, out_dir, report, gate, int(scores.argmax())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on a free port (sqlite backend, artifacts proxied to a local folder); its URI.

    Started in its own process group, which the finaliser ends (the server runs
    uvicorn and a job runner as child processes).
    """
    port = free_port()
    home = tmp_path / "mlflow-server"
    home.mkdir()
    log = (home / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
         "--artifacts-destination", str(home / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (home / "server.log").read_text()[-3000:]
            try:
                if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "mlflow server not up in 90 s:\n" + (home / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
