"""The CDK app in infra/ synthesizes, offline, the serving stack the context asks for.

infra/ is a CDK app folder, not a package of the project: `cdk` runs
``python app.py`` in it, and app.py imports its sibling ``dermascan_stack``.
These tests load that same file by path (importlib), under the same module
name, rather than making infra/ an importable package that only the tests
would use.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import aws_cdk as cdk
import pytest
from aws_cdk.assertions import Annotations, Match, Template

from .conftest import REPO

# Starting the jsii kernel (node) and synthesizing takes 20-60 s on CI's 2 cores.
pytestmark = pytest.mark.infra

INFRA = REPO / "infra"

CONTEXT = {
    "export_dir": "runs/train/20990101-000000/export",
    "runtime": "savedmodel",
    "memory_mb": 3008,
    "timeout_s": 25,
    "throttle_rate": 7,
    "throttle_burst": 11,
    "log_retention_days": 14,
    "stack_name": "DermascanTest",
    "environment": {"DERMASCAN_TFLITE": "int8_dynamic"},
}
ROUTE_KEYS = {"POST /v1/predict", "GET /health", "GET /v1/classes", "GET /v1/model"}


def load_stack_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dermascan_stack", INFRA / "dermascan_stack.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def infra() -> ModuleType:
    return load_stack_module()


def synth(infra: ModuleType, outdir: Path, context: dict, build_context: Path | None = None):
    """The stack and the path of its asset manifest, synthesized into outdir."""
    app = cdk.App(context=context, outdir=str(outdir))
    settings = infra.ServeSettings.from_context(app)
    stack = infra.DermascanStack(app, settings.stack_name, settings=settings, build_context=build_context)
    assembly = app.synth()
    return stack, Path(assembly.directory) / f"{settings.stack_name}.assets.json"


def docker_image(assets_json: Path) -> dict:
    (image,) = json.loads(assets_json.read_text())["dockerImages"].values()
    return image["source"]


@pytest.fixture(scope="module")
def synthesized(infra, tmp_path_factory):
    return synth(infra, tmp_path_factory.mktemp("cdk.out"), CONTEXT)


def test_template_follows_the_context(synthesized):
    stack, _ = synthesized
    assert stack.stack_name == "DermascanTest"
    template = Template.from_stack(stack)

    # One function (no log-retention custom resource), a container image.
    template.resource_count_is("AWS::Lambda::Function", 1)
    template.has_resource_properties(
        "AWS::Lambda::Function",
        {
            "PackageType": "Image",
            "Code": {"ImageUri": Match.any_value()},
            "MemorySize": 3008,
            "Timeout": 25,
            "Architectures": ["x86_64"],
            "Environment": {"Variables": {"DERMASCAN_RUNTIME": "savedmodel", "DERMASCAN_TFLITE": "int8_dynamic"}},
        },
    )

    # Its log group, with the retention, is the one it logs to.
    template.resource_count_is("AWS::Logs::LogGroup", 1)
    template.has_resource_properties("AWS::Logs::LogGroup", {"RetentionInDays": 14})
    (log_group_id,) = template.find_resources("AWS::Logs::LogGroup")
    (function,) = template.find_resources("AWS::Lambda::Function").values()
    assert function["Properties"]["LoggingConfig"] == {"LogGroup": {"Ref": log_group_id}}

    # An HTTP API whose routes all go to the function, as payload format 2.0.
    template.resource_count_is("AWS::ApiGatewayV2::Api", 1)
    template.has_resource_properties("AWS::ApiGatewayV2::Api", {"ProtocolType": "HTTP"})
    (function_id,) = template.find_resources("AWS::Lambda::Function")
    integrations = template.find_resources("AWS::ApiGatewayV2::Integration")
    assert [i["Properties"]["IntegrationUri"] for i in integrations.values()] == [{"Fn::GetAtt": [function_id, "Arn"]}]
    (integration,) = integrations.values()
    assert integration["Properties"]["IntegrationType"] == "AWS_PROXY"
    assert integration["Properties"]["PayloadFormatVersion"] == "2.0"
    routes = template.find_resources("AWS::ApiGatewayV2::Route")
    assert {r["Properties"]["RouteKey"] for r in routes.values()} == ROUTE_KEYS
    template.has_resource_properties("AWS::ApiGatewayV2::Route", {"RouteKey": "POST /v1/predict"})
    template.has_resource_properties(
        "AWS::Lambda::Permission", {"Action": "lambda:InvokeFunction", "Principal": "apigateway.amazonaws.com"}
    )

    # Throttling on the one, auto-deployed, $default stage.
    template.resource_count_is("AWS::ApiGatewayV2::Stage", 1)
    template.has_resource_properties(
        "AWS::ApiGatewayV2::Stage",
        {
            "StageName": "$default",
            "AutoDeploy": True,
            "DefaultRouteSettings": {"ThrottlingRateLimit": 7, "ThrottlingBurstLimit": 11},
        },
    )

    # The URL of that API.
    (api_id,) = template.find_resources("AWS::ApiGatewayV2::Api")
    url = template.find_outputs("ApiUrl")["ApiUrl"]["Value"]
    assert {"Ref": api_id} in url["Fn::Join"][1]
    assert url["Fn::Join"][1][0] == "https://"
    template.has_output("FunctionName", {"Value": {"Ref": function_id}})


def test_image_is_built_for_lambda_with_the_export_dir(synthesized):
    _, assets_json = synthesized
    source = docker_image(assets_json)
    assert source["dockerBuildArgs"] == {"EXPORT_DIR": "runs/train/20990101-000000/export"}
    assert source["dockerFile"] == "Dockerfile"
    assert source["platform"] == "linux/amd64"
    staged = assets_json.parent / source["directory"]
    assert (staged / "Dockerfile").read_text() == (REPO / "Dockerfile").read_text()


def test_a_missing_export_dir_is_a_warning(synthesized):
    stack, _ = synthesized
    Annotations.from_stack(stack).has_warning("*", Match.string_like_regexp("export_dir=runs/train/.*no such folder"))


def test_defaults_are_the_documented_ones(infra):
    settings = infra.ServeSettings.from_context(cdk.App())
    assert settings == infra.ServeSettings(
        export_dir="export",
        runtime="tflite",
        memory_mb=2048,
        timeout_s=30,
        throttle_rate=20,
        throttle_burst=40,
        log_retention_days=30,
        stack_name="DermascanServe",
        environment=(),
    )


def test_command_line_context_strings_are_parsed(infra):
    # `cdk -c key=value` passes every value as a string.
    context = {"memory_mb": "4096", "timeout_s": "10", "throttle_rate": "0.5", "throttle_burst": "3",
               "log_retention_days": "7", "export_dir": "./runs/train/x/export/",
               "environment": '{"DERMASCAN_NUM_THREADS": 2}'}
    settings = infra.ServeSettings.from_context(cdk.App(context=context))
    assert (settings.memory_mb, settings.timeout_s, settings.throttle_rate, settings.throttle_burst) == (4096, 10, 0.5, 3)
    assert settings.log_retention_days == 7
    assert settings.export_dir == "runs/train/x/export"
    assert settings.environment == (("DERMASCAN_NUM_THREADS", "2"),)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("memory_mb", 64, "between 128 and 10240"),
        ("memory_mb", "lots", "expected an integer"),
        ("memory_mb", True, "expected an integer"),
        ("timeout_s", 901, "between 1 and 900"),
        ("throttle_rate", 0, "must be positive"),
        ("throttle_burst", 0, "between 1 and 5000"),
        ("log_retention_days", 31, "CloudWatch Logs accepts only"),
        ("runtime", "onnx", "expected one of tflite, savedmodel, keras"),
        ("export_dir", "/abs/export", "relative to the repository root"),
        ("export_dir", "../elsewhere/export", "relative to the repository root"),
        ("export_dir", ".", "relative to the repository root"),
        ("environment", "not json", "not a JSON object"),
        ("environment", {"DERMASCAN_EXPORT_DIR": "/x"}, "set by the image"),
    ],
)
def test_bad_context_is_refused(infra, key, value, message):
    with pytest.raises(infra.InfraConfigError, match=message):
        infra.ServeSettings.from_context(cdk.App(context={key: value}))


def make_checkout(root: Path) -> None:
    """A checkout with the real Dockerfile and .dockerignore, and one file of each kind."""
    files = {
        "pyproject.toml": "[project]\n",
        "README.md": "# readme\n",
        "src/dermascan/__init__.py": "",
        "src/dermascan/serve/__init__.py": "",
        "configs/train.yaml": "a: 1\n",
        "runs/train/20990101-000000/export/labels.json": "{}\n",
        "runs/train/20990101-000000/export/model_fp32.tflite": "tflite\n",
        "runs/train/20990101-000000/export/model_card.md": "card\n",
        "runs/train/20990101-000000/export/saved_model/saved_model.pb": "pb\n",
        "runs/train/20990101-000000/export/MANIFEST.sha256": "sums\n",
        # Not needed by the image: none of these may be hashed or sent to docker.
        "src/dermascan/__pycache__/x.cpython-311.pyc": "pyc\n",
        "src/dermascan.egg-info/PKG-INFO": "info\n",
        "runs/train/20990101-000000/checkpoints/best.keras": "ckpt\n",
        "runs/train/20990101-000000/predictions.csv": "p\n",
        "runs/mlflow.db": "db\n",
        "mlruns/0/meta.yaml": "m\n",
        "data/processed/demo/manifest.csv": "m\n",
        ".venv/lib/site.py": "v\n",
        ".git/HEAD": "ref\n",
        "tests/test_x.py": "t\n",
        "scripts/bench.py": "b\n",
        "infra/app.py": "a\n",
        "infra/cdk.out/manifest.json": "{}\n",
        "outputs/x.log": "o\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    for name in ("Dockerfile", ".dockerignore"):
        shutil.copyfile(REPO / name, root / name)


def staged_files(assets_json: Path) -> set[str]:
    staged = assets_json.parent / docker_image(assets_json)["directory"]
    return {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}


def test_build_context_is_only_what_the_image_needs(infra, tmp_path):
    checkout = tmp_path / "checkout"
    make_checkout(checkout)
    context = {"export_dir": "runs/train/20990101-000000/export"}
    stack, assets_json = synth(infra, tmp_path / "out1", context, build_context=checkout)
    Annotations.from_stack(stack).has_no_warning("*", Match.string_like_regexp("export_dir="))
    export = "runs/train/20990101-000000/export"
    assert staged_files(assets_json) == {
        "Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "configs/train.yaml",
        "src/dermascan/__init__.py", "src/dermascan/serve/__init__.py",
        f"{export}/labels.json", f"{export}/model_fp32.tflite", f"{export}/model_card.md",
        f"{export}/saved_model/saved_model.pb", f"{export}/MANIFEST.sha256",
    }
    image_hash = assets_json.parent.joinpath(docker_image(assets_json)["directory"]).name

    # A change outside the image keeps the image; a new model makes a new one.
    (checkout / "tests/test_x.py").write_text("changed\n")
    (checkout / "runs/train/20990101-000000/checkpoints/best.keras").write_text("changed\n")
    _, assets_json = synth(infra, tmp_path / "out2", context, build_context=checkout)
    assert assets_json.parent.joinpath(docker_image(assets_json)["directory"]).name == image_hash
    (checkout / export / "model_fp32.tflite").write_text("retrained\n")
    _, assets_json = synth(infra, tmp_path / "out3", context, build_context=checkout)
    assert assets_json.parent.joinpath(docker_image(assets_json)["directory"]).name != image_hash


def test_cdk_json_app_command_synthesizes(tmp_path):
    """What `cdk synth` does: run cdk.json's "app" in infra/ with CDK_OUTDIR and CDK_CONTEXT_JSON."""
    command = shlex.split(json.loads((INFRA / "cdk.json").read_text())["app"])
    assert command[0] == "python"
    env = {**os.environ, "CDK_OUTDIR": str(tmp_path), "CDK_CONTEXT_JSON": json.dumps({"memory_mb": 1024})}
    run = subprocess.run([sys.executable, *command[1:]], check=False, cwd=INFRA, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    template = json.loads((tmp_path / "DermascanServe.template.json").read_text())
    (function,) = [r for r in template["Resources"].values() if r["Type"] == "AWS::Lambda::Function"]
    assert function["Properties"]["MemorySize"] == 1024
