# AWS Lambda container image of the dermascan API (dermascan.serve, FastAPI on Mangum).
#
# Build from the repository root, naming the export folder to bake in (a path
# inside the repository: it is the build context, see .dockerignore):
#
#   docker build --build-arg EXPORT_DIR=runs/train/<ts>/export -t dermascan-serve .
#
# Run locally with the Lambda runtime interface emulator that the base image
# ships, then POST an API Gateway v2 event to it:
#
#   docker run --rm -p 9000:8080 dermascan-serve
#   curl -XPOST localhost:9000/2015-03-31/functions/function/invocations -d @event.json
#
# `cdk deploy` (infra/) builds the same image with the same build argument.

# Python 3.12, not 3.11: the Lambda python:3.11 image is Amazon Linux 2
# (glibc 2.26), and tensorflow 2.21 (a dependency of the package) has no wheel
# for it (its wheels are manylinux_2_27). python:3.12 and later are Amazon
# Linux 2023 (glibc 2.34).
ARG PYTHON_VERSION=3.12
FROM public.ecr.aws/lambda/python:${PYTHON_VERSION}

# The package, not editable, with the serving extra and without dev. The
# source is only needed to build it. The import check fails the build, rather
# than the first request, if the wheel lacks dermascan.serve (setuptools
# packages are listed by hand in pyproject.toml) or the extra lacks the app's
# dependencies.
COPY pyproject.toml README.md /tmp/dermascan/
COPY src /tmp/dermascan/src
COPY configs /tmp/dermascan/configs
RUN pip install --no-cache-dir "/tmp/dermascan[serve]" \
 && rm -rf /tmp/dermascan \
 && python -c "from dermascan.serve import lambda_handler; import fastapi, mangum"

# The model last: a new model rebuilds only this layer. Lambda runs the
# function as an unprivileged user, so the files must be world-readable
# whatever their mode in the checkout.
ARG EXPORT_DIR=export
COPY --chmod=755 ${EXPORT_DIR}/ ${LAMBDA_TASK_ROOT}/model/

# DERMASCAN_RUNTIME is also set by the stack (context `runtime`). Only /tmp
# is writable on Lambda: matplotlib's and Keras's config folders go there.
ENV DERMASCAN_EXPORT_DIR=${LAMBDA_TASK_ROOT}/model \
    DERMASCAN_RUNTIME=tflite \
    MPLCONFIGDIR=/tmp/matplotlib \
    KERAS_HOME=/tmp/.keras

CMD ["dermascan.serve.lambda_handler"]
