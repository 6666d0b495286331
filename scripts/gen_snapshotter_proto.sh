#!/usr/bin/env bash
# Regenerate nydus_py/snapshotter/proto/*_pb2*.py from containerd's snapshots API.
#
# Source: Debian's golang-github-containerd-containerd-dev (the .proto files of containerd's
# API, same wire format for containerd 1.6 and 1.7). The gogoproto options are Go-only; they are
# stripped, and the imports are rewritten so the generated modules import each other as
# `nydus_py.snapshotter.proto.*`. The proto package names (and so the gRPC method paths such as
# /containerd.services.snapshots.v1.Snapshots/Prepare) are unchanged.
#
# Needs: apt golang-github-containerd-containerd-dev; pip grpcio-tools (the venv's).
set -euo pipefail
cd "$(dirname "$0")/.."
API=${CONTAINERD_API:-/usr/share/gocode/src/github.com/containerd/containerd/api}
PY=${PYTHON:-.venv/bin/python}
OUT=nydus_py/snapshotter/proto
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/$OUT"
strip_gogo() {
  sed -E -e '/import weak "gogoproto\/gogo.proto";/d' \
         -e '/^\s*option \(gogoproto\.[a-z_]+\) = [^;]*;/d' \
         -e 's/ \[\(gogoproto\.[^]]*\]//g' \
         -e 's#"github.com/containerd/containerd/api/types/mount.proto"#"'"$OUT"'/mount.proto"#' "$1"
}
strip_gogo "$API/types/mount.proto" > "$tmp/$OUT/mount.proto"
strip_gogo "$API/services/snapshots/v1/snapshots.proto" > "$tmp/$OUT/snapshots.proto"
if grep -n gogoproto "$tmp/$OUT"/*.proto; then echo "gen: gogoproto left over" >&2; exit 1; fi
"$PY" -m grpc_tools.protoc -I "$tmp" --python_out=. --grpc_python_out=. \
  "$tmp/$OUT/mount.proto" "$tmp/$OUT/snapshots.proto"
rm -f "$OUT/mount_pb2_grpc.py"
cp "$tmp/$OUT/mount.proto" "$tmp/$OUT/snapshots.proto" "$OUT/"
echo "gen: wrote $(ls "$OUT"/*_pb2*.py | tr '\n' ' ')"
