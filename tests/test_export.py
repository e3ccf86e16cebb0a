"""Export: every format round-trips on the real sample images; labels, manifest, registry, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import keras
import mlflow
import numpy as np
import pytest
from omegaconf import OmegaConf

from dermascan import tracking
from dermascan.artifacts import read_labels, tflite_name
from dermascan.checksums import ManifestError, verify_manifest
from dermascan.classes import CODES, INDEX
from dermascan.export import ExportError, export_model, write_coreml
from dermascan.runtime import TFLITE_KINDS, load_predictor

from .conftest import EXPORT_SIZE, REPO

SIZE = EXPORT_SIZE


def test_every_format_round_trips_on_the_real_sample_images(exported, sample_pixels):
    model, out_dir, report = exported
    images, _ = sample_pixels
    # The exported model holds the temperature: the reference is the served (calibrated) model.
    reference = keras.models.load_model(out_dir / "model.keras").predict(images.astype(np.float32), verbose=0)
    raw = model.predict(images.astype(np.float32), verbose=0)
    assert np.abs(reference - raw).max() > 1e-4  # the temperature is really applied
    assert np.ptp(reference, axis=0).max() > 1e-3  # and the answers depend on the image
    np.testing.assert_array_equal(reference.argmax(1), raw.argmax(1))  # and keeps the ranking
    for runtime in ("keras", "savedmodel"):
        np.testing.assert_allclose(load_predictor(out_dir, runtime)(images)["probabilities"], reference, atol=1e-5, err_msg=runtime)
    # TFLite's float32 kernels (XNNPACK or its reference kernels alike) sum in another order than
    # TensorFlow's: up to ~2e-5 apart on this random-weight model (2.2e-6 on the trained demo model), never a top-1 change.
    fp32 = load_predictor(out_dir, "tflite", "fp32")(images)["probabilities"]
    np.testing.assert_allclose(fp32, reference, atol=5e-5)
    assert np.array_equal(fp32.argmax(1), reference.argmax(1)) and report["formats"]["tflite_fp32"]["top1_agreement"] == 1.0
    for kind in ("fp16", "int8_dynamic", "int8_full"):
        result = report["formats"][f"tflite_{kind}"]
        got = load_predictor(out_dir, "tflite", kind)(images)["probabilities"]
        agreement = float(np.mean(got.argmax(1) == reference.argmax(1)))
        assert agreement == pytest.approx(result["top1_agreement"]), kind
        assert result["kept"] is True and 0.0 <= result["balanced_accuracy"] <= 1.0
    assert report["n_images"] == 240 and report["source"] == "test split"


def test_quantised_sizes_and_latencies_are_reported_against_fp32(exported):
    _, out_dir, report = exported
    formats = report["formats"]
    sizes = {kind: (out_dir / tflite_name(kind)).stat().st_size for kind in TFLITE_KINDS}
    assert formats["tflite_fp32"]["bytes"] == sizes["fp32"]
    assert sizes["fp16"] < 0.6 * sizes["fp32"]
    assert formats["tflite_int8_dynamic"]["size_vs_fp32"] < 0.4
    assert formats["tflite_int8_full"]["size_vs_fp32"] < 0.45
    for kind in TFLITE_KINDS:
        assert formats[f"tflite_{kind}"]["latency_ms"] > 0 and formats[f"tflite_{kind}"]["latency_vs_tflite_fp32"] > 0
    assert json.loads((out_dir / "parity.json").read_text()) == json.loads(json.dumps(report))


@pytest.mark.integration
def test_preprocessing_is_inside_the_savedmodel_uint8_and_float_endpoints(exported, sample_pixels):
    _, out_dir, _ = exported
    images = sample_pixels[0][:16]
    predict = load_predictor(out_dir, "savedmodel")
    reference = keras.models.load_model(out_dir / "model.keras").predict(images.astype(np.float32), verbose=0)
    np.testing.assert_allclose(predict(images)["probabilities"], reference, atol=1e-5)  # uint8 pixels, no Python-side math
    np.testing.assert_allclose(predict(images.astype(np.float32))["probabilities"], reference, atol=1e-5)
    # full-integer TFLite takes uint8 pixels, its scale set by the calibration images' range (~1)
    from ai_edge_litert.interpreter import Interpreter

    details = Interpreter(model_path=str(out_dir / tflite_name("int8_full"))).get_input_details()[0]
    scale, zero_point = details["quantization"]
    assert details["dtype"] == np.uint8 and 0.97 < scale <= 1.0 and zero_point in (0, 1, 2)


def test_labels_order_is_the_model_output_order_and_classes_py(exported):
    model, out_dir, _ = exported
    labels = read_labels(out_dir)
    assert [c["code"] for c in labels["classes"]] == list(CODES) == sorted(INDEX, key=INDEX.get)
    assert [c["index"] for c in labels["classes"]] == list(range(8))
    assert model.output_shape[-1] == len(labels["classes"]) == 8
    assert labels["input"]["size"] == [SIZE, SIZE] and labels["temperature"] == 1.7
    assert {c["category"] for c in labels["classes"]} == {"malignant", "pre-malignant", "benign"}
    assert "not a diagnosis" in labels["disclaimer"]


def test_tampered_missing_or_extra_files_fail_the_manifest_check(exported, tmp_path):
    _, out_dir, _ = exported
    assert verify_manifest(out_dir) == len([p for p in out_dir.rglob("*") if p.is_file()]) - 1
    copy = tmp_path / "export"
    shutil.copytree(out_dir, copy)
    target = copy / tflite_name("fp32")
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="changed: model_fp32.tflite"):
        verify_manifest(copy)
    shutil.copyfile(out_dir / tflite_name("fp32"), target)
    verify_manifest(copy)
    (copy / "saved_model" / "extra.pb").write_bytes(b"x")
    with pytest.raises(ManifestError, match="not in the manifest: saved_model/extra.pb"):
        verify_manifest(copy)
    (copy / "saved_model" / "extra.pb").unlink()
    (copy / "labels.json").unlink()
    with pytest.raises(ManifestError, match="missing: labels.json"):
        verify_manifest(copy)


@pytest.mark.integration
def test_a_format_that_fails_to_run_is_not_kept_and_named(tmp_path, sample_pixels, monkeypatch):
    """A TFLite kernel can refuse its inputs at run time (int8 DIV by a zero): an ExportError, not a traceback."""
    import dermascan.export as export

    real = export.tflite_predictor
    calls = []

    def second_fails(content, **kwargs):
        predict = real(content, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            def crash(images):
                raise RuntimeError("tflite/kernels/div.cc:262 data[i] != zero_point was not true.\nNode 16 failed")
            return crash
        return predict

    monkeypatch.setattr(export, "tflite_predictor", second_fails)
    images, labels = sample_pixels
    model = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(8),
                              keras.layers.Softmax()])
    out_dir = tmp_path / "export"
    with pytest.raises(ExportError, match=r"tflite_fp16: fails to run on the parity images: tflite/kernels/div\.cc"):
        export_model(model, out_dir, image_size=SIZE, tflite=["fp32", "fp16"], resize_method="bilinear", min_agreement=0.99, parity_images=images[:16],
                     parity_labels=labels[:16])
    parity = json.loads((out_dir / "parity.json").read_text())["formats"]
    assert parity["tflite_fp32"]["kept"] and (out_dir / "model_fp32.tflite").is_file()
    assert parity["tflite_fp16"]["kept"] is False and "top1_agreement" not in parity["tflite_fp16"]
    assert not (out_dir / "model_fp16.tflite").exists()

    # Not required (train's formats from the configs): dropped with a warning, recorded, and the export succeeds.
    calls.clear()
    out_dir = tmp_path / "optional"
    report = export_model(model, out_dir, image_size=SIZE, tflite=["fp32", "fp16"], resize_method="bilinear",
                          min_agreement=0.99, parity_images=images[:16], parity_labels=labels[:16], required=[],
                          card="# card\n")
    assert report["dropped"] == [["tflite_fp16", "fails to run on the parity images: tflite/kernels/div.cc:262 "
                                                  "data[i] != zero_point was not true."]]
    assert json.loads((out_dir / "parity.json").read_text())["dropped"] == report["dropped"]
    assert "**Dropped:** tflite_fp16: fails to run" in (out_dir / "model_card.md").read_text()
    assert (out_dir / "model_fp32.tflite").is_file() and not (out_dir / "model_fp16.tflite").exists()
    verify_manifest(out_dir)


def test_export_refuses_unknown_kinds_and_int8_full_without_representative_images(tmp_path):
    model = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(8)])
    with pytest.raises(ExportError, match="unknown export.tflite kind"):
        export_model(model, tmp_path / "a", image_size=SIZE, tflite=["int4"], resize_method="bilinear", min_agreement=0.99)
    with pytest.raises(ExportError, match="representative"):
        export_model(model, tmp_path / "b", image_size=SIZE, tflite=["int8_full"], resize_method="bilinear", min_agreement=0.99)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    precious = tmp_path / "run"
    (precious / "checkpoints").mkdir(parents=True)
    with pytest.raises(ExportError, match="not an export folder"):  # never rmtree a folder that is not an export
        export_model(model, precious, image_size=SIZE, tflite=[], resize_method="bilinear", min_agreement=0.99)
    assert (precious / "checkpoints").is_dir()


@pytest.mark.integration
def test_registered_model_loads_from_the_registry_and_runs(exported, tmp_path, sample_pixels):
    model, _, _ = exported
    settings = OmegaConf.create({"log_model": True, "register": True, "model_name": "dermascan-test"})
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    images = sample_pixels[0][:4].astype(np.float32)
    try:
        with mlflow.start_run():
            version = tracking.log_model(model, images[:1], settings)
        loaded = mlflow.keras.load_model(f"models:/dermascan-test/{version}")
    finally:
        mlflow.set_tracking_uri(None)
    assert version == "1"
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)


@pytest.mark.slow  # coremltools import and conversion (~15 s); an optional extra
def test_coreml_conversion_writes_an_mlpackage_listed_in_the_manifest(exported, tmp_path):
    _, out_dir, _ = exported
    copy = tmp_path / "export"
    shutil.copytree(out_dir, copy)
    package = write_coreml(copy, SIZE)
    assert (package / "Manifest.json").is_file()
    assert any(line.endswith("model.mlpackage/Manifest.json") for line in (copy / "MANIFEST.sha256").read_text().splitlines())
    verify_manifest(copy)


@pytest.mark.slow  # a second SavedModel + TFLite export (~50 s); export_run itself runs in every debug train
def test_export_cli_reexports_a_finished_run(debug_run, tmp_path):
    cfg, _, _ = debug_run
    out_dir = tmp_path / "again"
    result = subprocess.run(
        [sys.executable, "-m", "dermascan.export", f"run_dir={cfg.run_dir}", f"out_dir={out_dir}",
         "export.tflite=[fp32]", "export.latency_runs=0", "export.parity_samples=8", "log_to_mlflow=false"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert verify_manifest(out_dir) > 5
    parity = json.loads((out_dir / "parity.json").read_text())
    assert parity["n_images"] == 8 and parity["formats"]["tflite_fp32"]["top1_agreement"] == 1.0
    card = (out_dir / "model_card.md").read_text()
    assert "not a diagnosis" in card.lower() and "balanced accuracy" in card and "Fitzpatrick" in card
