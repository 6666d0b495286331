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
$B/nydusd mount --image "oci:$W/nydus:latest" --cache-dir "$W/cache" --apisock "$W/api.sock" \
  --log-file "$W/nydusd.log" --daemon "$W/mnt"
trap 'fusermount3 -u "$W/mnt" 2>/dev/null || fusermount3 -u -z "$W/mnt" 2>/dev/null || true' EXIT
echo "== chroot $W/mnt /bin/sh -c 'echo hello; ls /; busybox | head -1; md5sum /bin/busybox'"
chroot "$W/mnt" /bin/sh -c 'echo "hello from a lazily mounted rootfs"; ls /; busybox | head -1; md5sum /bin/busybox'
metrics=$(curl -s --unix-socket "$W/api.sock" http://localhost/api/v1/metrics/backend)
$B/python - "$W" "$metrics" <<'PY'
import json, os, sys
work, metrics = sys.argv[1], json.loads(sys.argv[2])
def tree_size(d):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
image, source = tree_size(f"{work}/nydus/blobs"), tree_size(f"{work}/oci/blobs")
fetched, reads = metrics["read_amount_total"], metrics["read_count"]
print(f"== source OCI image {source:,} bytes; nydus-py image {image:,} bytes (blobs + bootstrap)")
print(f"== fetched from the backend: {fetched:,} bytes in {reads} reads = {100 * fetched / image:.1f}% of the image")
PY
echo "== unmounting"
