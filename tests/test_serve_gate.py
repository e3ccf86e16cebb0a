"""The out-of-scope gate through the export and the service: every format carries it, and an out-of-scope
upload gets the out-of-scope answer over real HTTP and through the Lambda handler."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from dermascan.runtime import load_predictor
from dermascan.serve import aws, create_app, lambda_handler
from dermascan.serve.app import OUT_OF_SCOPE_MESSAGE

from .conftest import EXPORT_SIZE, synthetic_outside
from .test_serve import Server, http_api_event, sample_paths

pytestmark = pytest.mark.integration


def test_every_format_returns_the_gate_score_and_agrees_on_the_decision(exported_gated, sample_pixels):
    _, out_dir, report, gate, rejected = exported_gated
    images, _ = sample_pixels
    outside = synthetic_outside(EXPORT_SIZE)
    labels = json.loads((out_dir / "labels.json").read_text())
    assert labels["out_of_scope"]["threshold"] == pytest.approx(gate.threshold)
    assert labels["out_of_scope"]["output"] == "out_of_scope" and labels["out_of_scope"]["val_rejected"] == 0.05
    keras_scores = load_predictor(out_dir, "keras")(np.concatenate([images, outside]))["out_of_scope"]
    # This backbone is untrained, so its features separate little (the real-model separation is a slow test in
    # test_real_recipe.py); what the service tests below need holds: one sample out, most lesions in.
    assert keras_scores[rejected] > gate.threshold
    assert np.mean(keras_scores[: len(images)] <= gate.threshold) >= 0.9
    for runtime, kind in (("savedmodel", "fp32"), ("tflite", "fp32"), ("tflite", "int8_full")):
        name = "savedmodel" if runtime == "savedmodel" else f"tflite_{kind}"
        decision = report["formats"][name]["out_of_scope_decision"]
        assert decision["n"] == len(images) + len(outside), decision
        if decision["agreement"] < 0.99:  # the gate refuses a format whose in/out answers differ from Keras's
            assert name == "tflite_int8_full" and not (out_dir / "model_int8_full.tflite").exists()
            assert any(r.startswith("out-of-scope decision agreement") for r in report["formats"][name]["refused"])
            assert name in dict(report["dropped"])
            continue
        scores = load_predictor(out_dir, runtime, kind)(np.concatenate([images, outside]))["out_of_scope"]
        decisions = (scores > gate.threshold) == (keras_scores > gate.threshold)
        assert decisions.mean() == pytest.approx(decision["agreement"]), (runtime, kind)
    assert report["formats"]["tflite_fp32"]["out_of_scope_decision"]["agreement"] == 1.0
    assert "out_of_scope" in report["decisions"]


@pytest.fixture(scope="module")
def gated_server(exported_gated):
    running = Server(create_app(exported_gated[1], "tflite"))
    yield running
    running.close()


def test_an_out_of_scope_upload_gets_the_out_of_scope_answer_over_http(gated_server, exported_gated):
    gate, rejected = exported_gated[3], sample_paths()[exported_gated[4]]
    with httpx.Client(base_url=gated_server.url, timeout=30) as http:
        body = http.post("/v1/predict", files={"file": (rejected.name, rejected.read_bytes(), "image/jpeg")}).json()
        assert body["in_scope"] is False and body["message"] == OUT_OF_SCOPE_MESSAGE
        assert body["top"] is None and body["referral"] is None and body["predictions_usable"] is False
        assert body["out_of_scope"]["score"] > body["out_of_scope"]["threshold"] == pytest.approx(gate.threshold)
        assert len(body["predictions"]) == 8  # kept, marked not to be used
        answers = []
        for path in sample_paths()[::12]:
            lesion = http.post("/v1/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")}).json()
            assert lesion["in_scope"] is (lesion["out_of_scope"]["score"] <= lesion["out_of_scope"]["threshold"])
            assert (lesion["top"] is not None) is lesion["in_scope"] and lesion["predictions_usable"] is lesion["in_scope"]
            answers.append(lesion["in_scope"])
        assert np.mean(answers) >= 0.9, answers
        model = http.get("/v1/model").json()
        assert model["out_of_scope"]["threshold"] == pytest.approx(gate.threshold)


def test_an_out_of_scope_upload_gets_the_out_of_scope_answer_through_lambda(monkeypatch, exported_gated):
    monkeypatch.setenv("DERMASCAN_EXPORT_DIR", str(exported_gated[1]))
    monkeypatch.setenv("DERMASCAN_RUNTIME", "tflite")
    aws.reset()
    try:
        rejected = sample_paths()[exported_gated[4]].read_bytes()
        result = lambda_handler(http_api_event("POST", "/v1/predict", rejected, "image/jpeg"), None)
    finally:
        aws.reset()
    body = json.loads(result["body"])
    assert result["statusCode"] == 200 and body["in_scope"] is False and body["top"] is None
    assert body["message"] == OUT_OF_SCOPE_MESSAGE
