"""The prediction service: a FastAPI app over an ``export/`` folder, and its AWS Lambda entry.

    python -m dermascan.serve export_dir=runs/train/<ts>/export port=8000      # uvicorn
    from dermascan.serve import create_app                                    # the ASGI app
    dermascan.serve.lambda_handler                                            # Lambda (Mangum)

Importing this package loads no model and imports neither FastAPI nor
TensorFlow: ``create_app`` is imported on first use, and ``lambda_handler``
builds its app from ``DERMASCAN_*`` environment variables on its first
invocation (see ``dermascan.serve.settings``).
"""

from __future__ import annotations

from typing import Any

from dermascan.serve.aws import lambda_handler

__all__ = ["create_app", "lambda_handler"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from dermascan.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'dermascan.serve' has no attribute {name!r}")
