"""Serving what an export folder really holds, and the Lambda events AWS really sends (issue 12, items 5-8).

- Lambda events with null or oddly typed fields get a 4xx JSON answer (or a
  200 where the event is still usable), never an exception;
- a bad export that still matches MANIFEST.sha256 (the manifest was
  regenerated after the damage) is refused: a DermascanError naming the
  file, exit status 2 and one line from the command line, and a 503 with
  the reason on every Lambda call;
- a MANIFEST.sha256 written by ``sha256sum`` itself (upper-case hex, the
  binary-mode ``*`` marker) is accepted, as ``sha256sum -c`` accepts it;
- ``python -m dermascan.serve`` without ``export_dir`` exits 2 with one line.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dermascan.artifacts import CHECKSUMS, LABELS, PARITY, tflite_name
from dermascan.checksums import ManifestError, sha256, verify_manifest, write_manifest
from dermascan.errors import DermascanError
from dermascan.serve import aws, create_app, lambda_handler
from tests.test_serve import free_port, http_api_event, sample_paths

REPO = Path(__file__).resolve().parents[1]
TFLITE = tflite_name("fp32")


@pytest.fixture(scope="module")
def export_dir(exported) -> Path:
    """The session's 64-px export (tests/conftest.py); copy it before changing anything."""
    return exported[1]


class LambdaContext:
    """What Lambda passes as ``context`` (the handler never reads it, but call it as Lambda does)."""

    function_name = "dermascan"
    aws_request_id = "c6af9ac6-7b61-11e6-9a41-93e812345678"
    memory_limit_in_mb = 1024

    @staticmethod
    def get_remaining_time_in_millis() -> int:
        return 30_000


def invoke(event) -> tuple[int, dict]:
    """Call the handler as Lambda does: a JSON round trip of the event, and a context object."""
    result = lambda_handler(json.loads(json.dumps(event)), LambdaContext())
    assert isinstance(result["statusCode"], int) and isinstance(result["body"], str), result
    return result["statusCode"], json.loads(result["body"])


@pytest.fixture
def lambda_for(monkeypatch):
    """Point the Lambda handler at an export folder; it is built again on the next invocation."""

    def point(folder: Path) -> None:
        monkeypatch.setenv("DERMASCAN_EXPORT_DIR", str(folder))
        monkeypatch.setenv("DERMASCAN_RUNTIME", "tflite")
        aws.reset()

    yield point
    aws.reset()


# ---------------------------------------------------------------- item 5: Lambda event shapes


def rest_v1_event(method: str = "GET", path: str = "/health") -> dict:
    """An API Gateway REST API (payload 1.0) proxy event."""
    return {
        "resource": "/{proxy+}",
        "path": path,
        "httpMethod": method,
        "headers": {"Host": "abc.execute-api.eu-west-1.amazonaws.com", "User-Agent": "test"},
        "multiValueHeaders": {"Host": ["abc.execute-api.eu-west-1.amazonaws.com"], "User-Agent": ["test"]},
        "queryStringParameters": None,
        "multiValueQueryStringParameters": None,
        "pathParameters": {"proxy": path.lstrip("/")},
        "stageVariables": None,
        "requestContext": {
            "resourcePath": "/{proxy+}",
            "httpMethod": method,
            "path": f"/prod{path}",
            "stage": "prod",
            "requestId": "id",
            "identity": {"sourceIp": "203.0.113.7", "userAgent": "test"},
        },
        "body": None,
        "isBase64Encoded": False,
    }


def alb_event(method: str = "GET", path: str = "/health") -> dict:
    """An Application Load Balancer target-group event (multi-value headers off)."""
    return {
        "requestContext": {"elb": {"targetGroupArn": "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/t/1"}},
        "httpMethod": method,
        "path": path,
        "queryStringParameters": {},
        "headers": {"host": "lb.example", "user-agent": "test", "x-forwarded-for": "203.0.113.7"},
        "body": "",
        "isBase64Encoded": False,
    }


def changed(event: dict, *path_and_value) -> dict:
    """A copy of ``event`` with one nested field set: changed(e, "requestContext", "identity", None)."""
    event = copy.deepcopy(event)
    *keys, last, value = path_and_value
    target = event
    for key in keys:
        target = target[key]
    target[last] = value
    return event


def v2_health() -> dict:
    return http_api_event("GET", "/health")


EVENT_SHAPES = {
    # name: (event factory, the statuses it may get: 200 where the event is usable, else a 4xx)
    "v2-headers-null": (lambda: changed(v2_health(), "headers", None), (200,)),
    "v2-headers-list": (lambda: changed(v2_health(), "headers", [["host", "x"]]), (400,)),
    "v2-header-value-int": (lambda: changed(v2_health(), "headers", "x-count", 5), (400,)),
    "v2-header-value-null": (lambda: changed(v2_health(), "headers", "x-count", None), (400,)),
    "v2-rawQueryString-null": (lambda: changed(v2_health(), "rawQueryString", None), (200,)),
    "v2-rawQueryString-int": (lambda: changed(v2_health(), "rawQueryString", 5), (400,)),
    "v2-body-object": (lambda: changed(http_api_event("POST", "/v1/predict", b"x", "image/jpeg"), "body", {"a": 1}),
                       (400,)),
    "v2-requestContext-http-string": (lambda: changed(v2_health(), "requestContext", "http", "GET"), (400,)),
    "v1-rest": (rest_v1_event, (200,)),
    "v1-rest-identity-null": (lambda: changed(rest_v1_event(), "requestContext", "identity", None), (200,)),
    "v1-rest-headers-null": (lambda: changed(changed(rest_v1_event(), "headers", None), "multiValueHeaders", None),
                             (200,)),
    "v1-rest-multivalue-header-int": (lambda: changed(rest_v1_event(), "multiValueHeaders", "X-Count", [5]), (400,)),
    "alb": (alb_event, (200,)),
    "alb-headers-null": (lambda: changed(alb_event(), "headers", None), (200,)),
    "alb-multivalue-headers-null": (lambda: changed(changed(alb_event(), "headers", None), "multiValueHeaders", None),
                                    (200,)),
}


@pytest.mark.parametrize("name", list(EVENT_SHAPES))
def test_lambda_answers_every_event_shape_with_json(name, export_dir, lambda_for):
    make, statuses = EVENT_SHAPES[name]
    lambda_for(export_dir)
    status, body = invoke(make())
    assert status in statuses, (name, status, body)
    if status == 200:
        assert body["status"] == "ok", body
    else:
        assert body["error"] == "bad_event" and body["detail"], body
    assert invoke(v2_health())[0] == 200  # and the handler still serves


# ---------------------------------------------------------------- item 6: bad exports that match their manifest


def set_labels(folder: Path, text: str | bytes) -> None:
    path = folder / LABELS
    path.write_bytes(text.encode() if isinstance(text, str) else text)


def classes_as_string(folder: Path) -> None:
    labels = json.loads((folder / LABELS).read_text())
    labels["classes"] = ",".join(c["code"] for c in labels["classes"])
    set_labels(folder, json.dumps(labels))


def truncate_tflite(folder: Path) -> None:
    path = folder / TFLITE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BAD_EXPORTS: dict[str, tuple[Callable[[Path], None], str]] = {
    # name: (the damage, the file the error must name)
    "labels-malformed-json": (lambda f: set_labels(f, '{"classes": [{"code": "AK",'), LABELS),
    "labels-not-utf8": (lambda f: set_labels(f, (f / LABELS).read_text().replace("e", "\xe9").encode("latin-1")), LABELS),
    "labels-json-list": (lambda f: set_labels(f, "[1, 2, 3]"), LABELS),
    "labels-classes-string": (classes_as_string, LABELS),
    "tflite-truncated": (truncate_tflite, TFLITE),
    "tflite-garbage": (lambda f: (f / TFLITE).write_bytes(bytes(range(256)) * 64), TFLITE),
    "tflite-empty": (lambda f: (f / TFLITE).write_bytes(b""), TFLITE),
    "parity-malformed-json": (lambda f: (f / PARITY).write_text("{"), PARITY),
}


def bad_export(export_dir: Path, tmp_path: Path, name: str) -> tuple[Path, str]:
    """A copy of the export with ``name``'s damage and a regenerated manifest that matches it."""
    damage, culprit = BAD_EXPORTS[name]
    folder = tmp_path / name
    shutil.copytree(export_dir, folder)
    damage(folder)
    write_manifest(folder)
    assert verify_manifest(folder) > 5  # the checksums alone cannot catch it
    return folder, culprit


@pytest.mark.parametrize("name", list(BAD_EXPORTS))
def test_bad_export_matching_its_manifest_is_refused_naming_the_file(name, export_dir, tmp_path, lambda_for):
    folder, culprit = bad_export(export_dir, tmp_path, name)
    with pytest.raises(DermascanError, match=re.escape(culprit)):
        create_app(folder, "tflite")  # fail_fast, as the command line starts it

    lambda_for(folder)  # create_app(..., fail_fast=False): every call answers the documented 503, with the reason
    jpeg = sample_paths()[0].read_bytes()
    for event in [v2_health(), http_api_event("POST", "/v1/predict", jpeg, "image/jpeg"), v2_health(),
                  http_api_event("GET", "/v1/classes")]:
        status, body = invoke(event)
        assert status == 503, (name, status, body)
        assert body["error"] == "model_unavailable" and culprit in body["detail"], body


@pytest.mark.parametrize("name", ["labels-malformed-json", "labels-not-utf8", "labels-json-list",
                                  "labels-classes-string", "tflite-truncated", "tflite-garbage"])
def test_command_line_refuses_a_bad_export_with_one_line(name, export_dir, tmp_path):
    folder, culprit = bad_export(export_dir, tmp_path, name)
    refused = subprocess.run(
        [sys.executable, "-m", "dermascan.serve", f"export_dir={folder}", f"port={free_port()}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, check=False, capture_output=True, text=True, timeout=120,
    )
    output = [line for line in (refused.stdout + refused.stderr).splitlines() if line.strip()]
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert len(output) == 1 and culprit in output[0] and "Traceback" not in output[0], output


# ---------------------------------------------------------------- item 7: MANIFEST.sha256 as sha256sum writes it


def small_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "export"
    (folder / "saved_model" / "variables").mkdir(parents=True)
    (folder / LABELS).write_text('{"classes": []}\n')
    (folder / "model_fp32.tflite").write_bytes(bytes(range(256)) * 8)
    (folder / "saved_model" / "variables" / "variables.index").write_bytes(b"\0\1\2")
    return folder


MANIFEST_STYLES = {
    "upper-case-hex": lambda digest, name: f"{digest.upper()}  {name}",
    "binary-marker": lambda digest, name: f"{digest} *{name}",
    "upper-case-binary": lambda digest, name: f"{digest.upper()} *{name}",
    "one-space": lambda digest, name: f"{digest} {name}",
    "tab": lambda digest, name: f"{digest}\t{name}",
    "leading-blanks": lambda digest, name: f"  {digest}  {name}",
    "dot-slash": lambda digest, name: f"{digest}  ./{name}",
    "bsd-tag": lambda digest, name: f"SHA256 ({name}) = {digest}",
    "comments-and-blank-lines": lambda digest, name: f"# {name}\n\n{digest}  {name}",
    "escaped-name": lambda digest, name: f"\\{digest}  {name}",
}


@pytest.mark.parametrize("style", list(MANIFEST_STYLES))
def test_manifest_in_every_sha256sum_style_is_accepted(style, tmp_path):
    folder = small_folder(tmp_path)
    write_manifest(folder)
    names = [line.split("  ", 1)[1] for line in (folder / CHECKSUMS).read_text().splitlines()]
    line = MANIFEST_STYLES[style]
    (folder / CHECKSUMS).write_text("".join(line(sha256(folder / n), n) + "\n" for n in names))
    assert verify_manifest(folder) == 3
    if shutil.which("sha256sum"):
        checked = subprocess.run(["sha256sum", "--strict", "-c", CHECKSUMS], cwd=folder, capture_output=True, text=True,
                                 check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    (folder / "model_fp32.tflite").write_bytes(b"changed")  # and a changed file is still caught in that style
    with pytest.raises(ManifestError, match="changed: model_fp32.tflite"):
        verify_manifest(folder)


@pytest.mark.parametrize("line", ["{digest}  /etc/hostname", "{digest}  ../x", "{short}  {name}", "{nothex}  {name}",
                                  "{digest}  ", "{digest} *", "{digest}{name}", "SHA1 ({name}) = {digest}"])
def test_manifest_lines_sha256sum_refuses_are_refused(line, tmp_path):
    folder = small_folder(tmp_path)
    write_manifest(folder)
    digest = sha256(folder / LABELS)
    bad = line.format(digest=digest, name=LABELS, short=digest[:63], nothex="g" * 64)
    (folder / CHECKSUMS).write_text((folder / CHECKSUMS).read_text() + bad + "\n")
    with pytest.raises(ManifestError, match="line 4"):
        verify_manifest(folder)
    if shutil.which("sha256sum"):
        checked = subprocess.run(["sha256sum", "--strict", "-c", CHECKSUMS], cwd=folder, capture_output=True, text=True,
                                 check=False)
        assert checked.returncode != 0, checked.stdout + checked.stderr


def test_manifest_that_is_not_utf8_is_refused(tmp_path):
    folder = small_folder(tmp_path)
    write_manifest(folder)
    (folder / CHECKSUMS).write_bytes((folder / CHECKSUMS).read_bytes() + b"\xff\xfe\n")
    with pytest.raises(ManifestError, match="UTF-8"):
        verify_manifest(folder)


# ---------------------------------------------------------------- item 8: no export_dir on the command line


@pytest.mark.integration
def test_command_line_without_export_dir_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dermascan.serve", "port=1", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, check=False, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))},
    )
    output = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(output) == 1 and "export_dir" in output[0], output
    assert "Traceback" not in output[0] and "MissingMandatoryValue" not in output[0], output
