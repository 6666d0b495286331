"""A small image with every inode kind (dirs, files, hardlinks, symlinks, devices, fifo,
xattrs, odd names, a big directory), built directly with BootstrapWriter. Shared by the vfs
unit tests and the FUSE end-to-end tests."""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from nydus_py.format import compression
from nydus_py.format.bootstrap import BootstrapWriter, ChunkSpec, compress_layer
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.layout import OCILayoutWriter

CHUNK = 4096
MTIME = 1_700_000_000_123_456_789
BIG_DIR_ENTRIES = 300
# `setcap cap_net_raw+ep`: vfs_cap_data revision 2 (the kernel validates the format on read).
CAP_NET_RAW_EP = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


@dataclass
class Rich:
    bootstrap: bytes                # plain msgpack
    blob_id: str
    blob: bytes
    files: dict[str, bytes]         # path -> content
    chunk_offsets: dict[str, list[tuple[int, int]]]  # path -> [(comp_off, comp_size)] in the blob

    def write_flat(self, root: Path) -> tuple[Path, Path]:
        """bootstrap file + blob dir with `<hex>` blobs; returns (bootstrap_path, blob_dir)."""
        blobs = root / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        (blobs / self.blob_id.split(":", 1)[1]).write_bytes(self.blob)
        boot = root / "bootstrap"
        boot.write_bytes(self.bootstrap)
        return boot, blobs

    def write_oci(self, root: Path, tag: str = "latest") -> Path:
        """An OCI layout holding the converted image (data blob + bootstrap layer)."""
        w = OCILayoutWriter(root)
        blob = w.put_bytes(self.blob, mt.NYDUS_PY_BLOB, {mt.ANNO_BLOB: "true"})
        boot = w.put_bytes(compress_layer(self.bootstrap), mt.NYDUS_PY_BOOTSTRAP,
                           {mt.ANNO_BOOTSTRAP: "true"})
        config = w.put_json({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": []}}, mt.OCI_CONFIG)
        manifest = w.put_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                               "config": config.to_json(),
                               "layers": [blob.to_json(), boot.to_json()]}, mt.OCI_MANIFEST)
        w.tag(manifest, tag)
        return root

    def blob_path_in(self, root: Path) -> Path:
        return root / "blobs" / "sha256" / self.blob_id.split(":", 1)[1]


def build_rich() -> Rich:
    rnd = random.Random(42)
    files = {
        "etc/hostname": b"nydus\n",
        "bin/hello": b"#!/bin/sh\necho hello from nydus\n",
        "big": bytes(rnd.getrandbits(8) for _ in range(3 * CHUNK + 123)),
        "text": b"abcdefgh" * 2000,           # compressible, 4 chunks, deduplicated
        "empty": b"",
        "hard1": b"same inode\n",
        "secret": b"top secret\n",
        "caf\xc3\xa9": b"utf-8 name\n",
    }
    for i in range(BIG_DIR_ENTRIES):
        files[f"many/f{i:04d}"] = f"{i}\n".encode()

    w = BootstrapWriter(chunk_size=CHUNK)
    blob = bytearray()
    specs: list[ChunkSpec] = []
    by_digest: dict[bytes, int] = {}
    chunk_ids: dict[str, list[int]] = {}
    offsets: dict[str, list[tuple[int, int]]] = {}
    uoff = 0
    for path, data in files.items():
        ids, offs = [], []
        for off in range(0, len(data), CHUNK):
            piece = data[off:off + CHUNK]
            d = hashlib.sha256(piece).digest()
            if d not in by_digest:
                z = compression.compress("zstd", piece)
                stored = z if z is not None else piece
                specs.append(ChunkSpec(d, len(blob), len(stored), uoff, len(piece), z is not None))
                blob += stored
                uoff += len(piece)
                by_digest[d] = len(specs) - 1
            ids.append(by_digest[d])
            offs.append((specs[by_digest[d]].comp_offset, specs[by_digest[d]].comp_size))
        chunk_ids[path], offsets[path] = ids, offs
    blob_id = "sha256:" + hashlib.sha256(blob).hexdigest()
    w.add_blob(blob_id=blob_id, compressor="zstd", compressed_size=len(blob),
               uncompressed_size=uoff, chunks=specs)

    def d(mode=0o755, uid=0, gid=0):
        return w.add_inode(mode=stat.S_IFDIR | mode, uid=uid, gid=gid, mtime_ns=MTIME)

    def f(path, mode=0o644, uid=0, gid=0, xattrs=None):
        return w.add_inode(mode=stat.S_IFREG | mode, uid=uid, gid=gid, mtime_ns=MTIME,
                           size=len(files[path]), chunk_ids=chunk_ids[path], xattrs=xattrs)

    root = d()
    etc, binr, dev, many, sub = d(), d(), d(), d(), d(0o750, 1000, 1000)
    for name, ino in ((b"etc", etc), (b"bin", binr), (b"dev", dev), (b"many", many), (b"sub", sub)):
        w.add_dirent(root, name, ino)
    w.add_dirent(etc, b"hostname", f("etc/hostname", xattrs={
        b"user.origin": b"nydus-py", b"security.capability": CAP_NET_RAW_EP}))
    w.add_dirent(binr, b"hello", f("bin/hello", mode=0o755))
    w.add_dirent(root, b"big", f("big"))
    w.add_dirent(root, b"text", f("text"))
    w.add_dirent(root, b"empty", f("empty"))
    w.add_dirent(root, b"secret", f("secret", mode=0o600, uid=1000, gid=1000))
    w.add_dirent(root, b"caf\xc3\xa9", f("caf\xc3\xa9"))
    hard = f("hard1")
    w.add_dirent(root, b"hard1", hard)
    w.add_dirent(sub, b"hard2", hard)
    w.add_dirent(sub, b"hard3", hard)
    w.add_dirent(root, b"link", w.add_inode(mode=stat.S_IFLNK | 0o777, uid=0, gid=0,
                                            mtime_ns=MTIME, symlink=b"etc/hostname"))
    w.add_dirent(root, b"abslink", w.add_inode(mode=stat.S_IFLNK | 0o777, uid=0, gid=0,
                                               mtime_ns=MTIME, symlink=b"/etc/hostname"))
    w.add_dirent(root, b"dangling", w.add_inode(mode=stat.S_IFLNK | 0o777, uid=0, gid=0,
                                                mtime_ns=MTIME, symlink=b"nowhere\xff"))
    w.add_dirent(dev, b"null", w.add_inode(mode=stat.S_IFCHR | 0o666, uid=0, gid=0,
                                           mtime_ns=MTIME, rdev=os.makedev(1, 3)))
    w.add_dirent(dev, b"sda", w.add_inode(mode=stat.S_IFBLK | 0o660, uid=0, gid=6,
                                          mtime_ns=MTIME, rdev=os.makedev(8, 0)))
    w.add_dirent(dev, b"fifo", w.add_inode(mode=stat.S_IFIFO | 0o644, uid=0, gid=0, mtime_ns=MTIME))
    for i in range(BIG_DIR_ENTRIES):
        w.add_dirent(many, f"f{i:04d}".encode(), f(f"many/f{i:04d}"))
    return Rich(w.to_bytes(), blob_id, bytes(blob), files, offsets)


def manifest_json(root: Path) -> dict:
    index = json.loads((root / "index.json").read_bytes())
    hexd = index["manifests"][0]["digest"].split(":", 1)[1]
    return json.loads((root / "blobs" / "sha256" / hexd).read_bytes())
