"""The serving stack: the Lambda container image behind an HTTP API.

- ``DockerImageFunction`` built from the repository's ``Dockerfile``, with
  ``EXPORT_DIR`` (the model folder, relative to the repository root) as a
  build argument. The build context is the repository root, filtered by its
  ``.dockerignore``, which CDK also applies when it fingerprints and stages
  the asset: only what the image needs is hashed, so a new model or new code
  gives a new image and an edit to the tests or the notebooks does not.
- An HTTP API (payload format 2.0, what Mangum expects) with one route per
  endpoint of the app, and request throttling on its ``$default`` stage.
- The function's CloudWatch log group, created here with a retention.
- Outputs: the API URL and the function name.

Every setting is CDK context, read by ``ServeSettings.from_context``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_apigatewayv2 as apigwv2
from aws_cdk import aws_apigatewayv2_integrations as integrations
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

REPO_ROOT = Path(__file__).resolve().parent.parent

# The endpoints of dermascan.serve. Any other path is answered 404 by API
# Gateway itself, without invoking (and paying for) the function.
ROUTES: tuple[tuple[apigwv2.HttpMethod, str], ...] = (
    (apigwv2.HttpMethod.POST, "/v1/predict"),
    (apigwv2.HttpMethod.GET, "/health"),
    (apigwv2.HttpMethod.GET, "/v1/classes"),
    (apigwv2.HttpMethod.GET, "/v1/model"),
)

# DERMASCAN_RUNTIME values that dermascan.serve accepts.
RUNTIMES = ("tflite", "savedmodel", "keras")

# The retentions CloudWatch Logs accepts, in days (RetentionDays' values).
RETENTION_DAYS = {
    1: logs.RetentionDays.ONE_DAY,
    3: logs.RetentionDays.THREE_DAYS,
    5: logs.RetentionDays.FIVE_DAYS,
    7: logs.RetentionDays.ONE_WEEK,
    14: logs.RetentionDays.TWO_WEEKS,
    30: logs.RetentionDays.ONE_MONTH,
    60: logs.RetentionDays.TWO_MONTHS,
    90: logs.RetentionDays.THREE_MONTHS,
    120: logs.RetentionDays.FOUR_MONTHS,
    150: logs.RetentionDays.FIVE_MONTHS,
    180: logs.RetentionDays.SIX_MONTHS,
    365: logs.RetentionDays.ONE_YEAR,
    400: logs.RetentionDays.THIRTEEN_MONTHS,
    545: logs.RetentionDays.EIGHTEEN_MONTHS,
    731: logs.RetentionDays.TWO_YEARS,
    1096: logs.RetentionDays.THREE_YEARS,
    1827: logs.RetentionDays.FIVE_YEARS,
    2192: logs.RetentionDays.SIX_YEARS,
    2557: logs.RetentionDays.SEVEN_YEARS,
    2922: logs.RetentionDays.EIGHT_YEARS,
    3288: logs.RetentionDays.NINE_YEARS,
    3653: logs.RetentionDays.TEN_YEARS,
}

# An HTTP API stops waiting for its integration after 29 s (CDK's bound for
# HttpLambdaIntegration's timeout): a longer function timeout only lets the
# function run on after the client got a 503.
API_TIMEOUT_S = 29

# Function environment variables that other settings own.
RESERVED_ENV = {
    "DERMASCAN_RUNTIME": "the `runtime` context key",
    "DERMASCAN_EXPORT_DIR": "the image (the model is baked in at /var/task/model)",
}

# Never part of the image, whatever .dockerignore says; also keeps the
# fingerprint fast if .dockerignore is lost. Appended after .dockerignore's
# patterns, so nothing here may be a folder that .dockerignore lets back in.
ALWAYS_EXCLUDE = [".git", ".venv", "**/cdk.out"]


class InfraConfigError(ValueError):
    """A context value that cannot be deployed."""


@dataclass(frozen=True)
class ServeSettings:
    """The stack's settings; each field is a context key of the same name."""

    export_dir: str = "export"
    runtime: str = "tflite"
    memory_mb: int = 2048
    timeout_s: int = 30
    throttle_rate: float = 20
    throttle_burst: int = 40
    log_retention_days: int = 30
    stack_name: str = "DermascanServe"
    # More function environment variables, e.g. {"DERMASCAN_TFLITE": "int8_dynamic"}
    # (the DERMASCAN_* settings of dermascan.serve).
    environment: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_context(cls, scope: Construct) -> ServeSettings:
        """Read every field from ``scope``'s context, with the defaults above.

        ``cdk -c key=value`` gives strings, cdk.json and ``App(context=...)``
        give JSON values: numbers are accepted either way.
        """
        defaults = cls()

        def get(key: str) -> Any:
            value = scope.node.try_get_context(key)
            return getattr(defaults, key) if value is None else value

        settings = cls(
            export_dir=_export_dir(get("export_dir")),
            runtime=_choice("runtime", get("runtime"), RUNTIMES),
            memory_mb=_integer("memory_mb", get("memory_mb"), 128, 10240),
            timeout_s=_integer("timeout_s", get("timeout_s"), 1, 900),
            throttle_rate=_number("throttle_rate", get("throttle_rate")),
            throttle_burst=_integer("throttle_burst", get("throttle_burst"), 1, 5000),
            log_retention_days=_integer("log_retention_days", get("log_retention_days"), 1, 3653),
            stack_name=str(get("stack_name")),
            environment=_environment(get("environment")),
        )
        if settings.log_retention_days not in RETENTION_DAYS:
            raise InfraConfigError(
                f"log_retention_days={settings.log_retention_days}: CloudWatch Logs accepts only "
                f"{sorted(RETENTION_DAYS)}"
            )
        return settings


def _integer(key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InfraConfigError(f"{key}={value!r}: expected an integer")
    try:
        number = int(value)
    except ValueError:
        raise InfraConfigError(f"{key}={value!r}: expected an integer") from None
    if not low <= number <= high:
        raise InfraConfigError(f"{key}={number}: must be between {low} and {high}")
    return number


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InfraConfigError(f"{key}={value!r}: expected a number")
    try:
        number = float(value)
    except ValueError:
        raise InfraConfigError(f"{key}={value!r}: expected a number") from None
    if not number > 0:
        raise InfraConfigError(f"{key}={number}: must be positive")
    return int(number) if number.is_integer() else number


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InfraConfigError(f"{key}={value!r}: expected one of {', '.join(choices)}")
    return value


def _environment(value: Any) -> tuple[tuple[str, str], ...]:
    """``{"NAME": "value"}``, or the same as a JSON string (``-c environment='{...}'``)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise InfraConfigError(f"environment={value!r}: not a JSON object ({error})") from None
    if not isinstance(value, (dict, tuple)):
        raise InfraConfigError(f"environment={value!r}: expected an object of NAME: value")
    pairs = tuple(sorted((str(k), str(v)) for k, v in dict(value).items()))
    for name, _ in pairs:
        if name in RESERVED_ENV:
            raise InfraConfigError(f"environment: {name} is set by {RESERVED_ENV[name]}, not here")
    return pairs


def _export_dir(value: Any) -> str:
    """The export folder as a relative POSIX path inside the build context (the repository root)."""
    path = PurePosixPath(str(value).replace("\\", "/"))
    if not str(value).strip() or path.is_absolute() or ".." in path.parts or path == PurePosixPath("."):
        raise InfraConfigError(
            f"export_dir={value!r}: give the export folder relative to the repository root "
            "(the Docker build context), e.g. runs/train/<timestamp>/export"
        )
    return path.as_posix()


class DermascanStack(cdk.Stack):
    """The Lambda function, its log group and the HTTP API in front of it."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        settings: ServeSettings,
        build_context: Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        context_dir = (build_context or REPO_ROOT).resolve()
        self._check_export(context_dir, settings.export_dir)
        # The default 30 s leaves the function a second past the API's limit.
        if settings.timeout_s > API_TIMEOUT_S + 1:
            cdk.Annotations.of(self).add_warning_v2(
                "dermascan:timeoutAboveApi",
                f"timeout_s={settings.timeout_s}: the HTTP API answers 503 after {API_TIMEOUT_S} s, "
                "so a request that takes longer fails for the client while the function runs on",
            )

        log_group = logs.LogGroup(
            self,
            "FunctionLogs",
            retention=RETENTION_DAYS[settings.log_retention_days],
        )

        code = lambda_.DockerImageCode.from_image_asset(
            str(context_dir),
            file="Dockerfile",
            build_args={"EXPORT_DIR": settings.export_dir},
            platform=ecr_assets.Platform.LINUX_AMD64,
            ignore_mode=cdk.IgnoreMode.DOCKER,
            exclude=ALWAYS_EXCLUDE,
        )
        function = lambda_.DockerImageFunction(
            self,
            "Function",
            code=code,
            description="dermascan skin-lesion classifier (FastAPI on Mangum)",
            architecture=lambda_.Architecture.X86_64,
            memory_size=settings.memory_mb,
            timeout=cdk.Duration.seconds(settings.timeout_s),
            # DERMASCAN_EXPORT_DIR is baked into the image (Dockerfile).
            environment={**dict(settings.environment), "DERMASCAN_RUNTIME": settings.runtime},
            log_group=log_group,
        )

        api = apigwv2.HttpApi(
            self,
            "Api",
            api_name=settings.stack_name,
            description="dermascan prediction API",
            # The default stage is declared below, with throttling.
            create_default_stage=False,
        )
        stage = apigwv2.HttpStage(
            self,
            "DefaultStage",
            http_api=api,
            stage_name="$default",
            auto_deploy=True,
            throttle=apigwv2.ThrottleSettings(
                rate_limit=settings.throttle_rate,
                burst_limit=settings.throttle_burst,
            ),
        )
        integration = integrations.HttpLambdaIntegration(
            "FunctionIntegration",
            function,
            payload_format_version=apigwv2.PayloadFormatVersion.VERSION_2_0,
            timeout=cdk.Duration.seconds(min(settings.timeout_s, API_TIMEOUT_S)),
        )
        for method, path in ROUTES:
            api.add_routes(path=path, methods=[method], integration=integration)

        cdk.CfnOutput(self, "ApiUrl", value=stage.url, description="Base URL of the API (POST v1/predict)")
        cdk.CfnOutput(self, "FunctionName", value=function.function_name)

    def _check_export(self, context_dir: Path, export_dir: str) -> None:
        """Warn now rather than fail later in ``docker build``'s COPY."""
        export_path = context_dir / export_dir
        if not export_path.is_dir():
            cdk.Annotations.of(self).add_warning_v2(
                "dermascan:exportMissing",
                f"export_dir={export_dir}: no such folder in the build context {context_dir}; "
                "the image build will fail. Run `python -m dermascan.export run_dir=...` and pass "
                "-c export_dir=runs/train/<timestamp>/export",
            )
        elif not (export_path / "labels.json").is_file():
            cdk.Annotations.of(self).add_warning_v2(
                "dermascan:exportIncomplete",
                f"export_dir={export_dir}: no labels.json in it; is it an export folder?",
            )
