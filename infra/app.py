"""CDK app: the dermascan serving stack.

    cdk deploy -c export_dir=runs/train/<timestamp>/export     # from this folder
    python app.py                                              # synth only, offline, into ./cdk.out

Settings are CDK context (``-c key=value``, or CDK_CONTEXT_JSON when run as
plain Python); see dermascan_stack.ServeSettings and README.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import aws_cdk as cdk
from dermascan_stack import DermascanStack, ServeSettings

HERE = Path(__file__).resolve().parent


def main() -> None:
    # The cdk CLI says where to write through CDK_OUTDIR; plain `python app.py`
    # would otherwise write to a temporary folder.
    outdir = None if "CDK_OUTDIR" in os.environ else str(HERE / "cdk.out")
    app = cdk.App(outdir=outdir)
    settings = ServeSettings.from_context(app)
    DermascanStack(
        app,
        settings.stack_name,
        settings=settings,
        # Account and region of the current AWS profile when deployed with the
        # CLI; environment-agnostic (and offline) otherwise.
        env=cdk.Environment(
            account=os.environ.get("CDK_DEFAULT_ACCOUNT"),
            region=os.environ.get("CDK_DEFAULT_REGION"),
        ),
    )
    cdk.Tags.of(app).add("project", "dermascan")
    app.synth()


if __name__ == "__main__":
    main()
