#!/usr/bin/env bash
# Regenerate nydus_py/snapshotter/proto/cri_image_pb2*.py from cri_image.proto (the few CRI
# ImageService messages the image-service proxy uses, written from Kubernetes' CRI API
# definition; no Debian package ships it). Needs pip grpcio-tools (the [dev] extra).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. nydus_py/snapshotter/proto/cri_image.proto
echo "gen: wrote $(ls nydus_py/snapshotter/proto/cri_image_pb2*.py | tr '\n' ' ')"
