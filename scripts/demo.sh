#!/usr/bin/env bash
# The README's demo: build a real image, convert it, mount it lazily, run a command inside it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
W=${DEMO_DIR:-/tmp/nydus-py-demo}
B=.venv/bin
if mountpoint -q "$W/mnt" 2>/dev/null || [ -d "$W/mnt" ] && ! ls "$W/mnt" >/dev/null 2>&1; then
  fusermount3 -u -z "$W/mnt" 2>/dev/null || true
fi
rm -rf "$W"; mkdir -p "$W/mnt"
echo "== building a busybox + real-files OCI image in $W/oci"
$B/python scripts/demo_image.py "$W/oci" $((40 << 20))
echo "== nydusify convert"
$B/nydusify convert --source "oci:$W/oci:latest" --target "oci:$W/nydus:latest"
echo "== nydusd mount (lazy, local backend)"
$B/nydusd mount --image "oci:$W/nydus:latest" --cache-dir "$W/cache" --daemon "$W/mnt"
trap 'fusermount3 -u "$W/mnt" 2>/dev/null || fusermount3 -u -z "$W/mnt" 2>/dev/null || true' EXIT
echo "== chroot $W/mnt /bin/sh -c 'echo hello; ls /; busybox | head -1; md5sum /bin/busybox'"
chroot "$W/mnt" /bin/sh -c 'echo "hello from a lazily mounted rootfs"; ls /; busybox | head -1; md5sum /bin/busybox'
image=$(du -sb "$W/nydus/blobs" | cut -f1)
fetched=$(find "$W/cache" -name '*.data' -printf '%b\n' 2>/dev/null | awk '{s+=$1*512} END {print s+0}')
files=$(du -sb --apparent-size "$W/oci/blobs" | cut -f1)
echo "== image: ${image} bytes (nydus blobs + bootstrap), source OCI ${files} bytes"
echo "== fetched into the chunk cache: ${fetched} bytes ($(awk -v a="$fetched" -v b="$image" 'BEGIN{printf "%.1f", 100*a/b}')% of the image)"
