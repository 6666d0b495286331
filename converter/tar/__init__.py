"""A bytes-exact, bounded tar reader: an uncompressed layer stream → `TarEntry` objects.

Modules: `entry` (TarEntry, EntryKind), `headers` (header blocks, PAX records, xattr records),
`paths` (the path policy below), `reader` (the entry stream). converter/decompress.py gives
the uncompressed stream. `iter_entries()` reads that stream one `TarEntry` at a time. Names,
link targets and xattr values stay `bytes` end to end. Memory is bounded whatever the layer: data is read in the
consumer's pieces, skipped data is read in 1 MiB pieces, and every header that is buffered
(PAX, GNU long names, sparse maps) has a hard limit.

Tar formats read: v7, ustar (prefix), GNU (long names 'L'/'K', base-256 numbers, old sparse
'S' with extension blocks, dumpdir 'D' as a directory), PAX (path, linkpath, size, uid, gid,
nanosecond mtime, SCHILY.xattr.*, LIBARCHIVE.xattr.*, GNU sparse 0.0/0.1/1.0). Global PAX
headers ('g') are checked and ignored (Go's archive/tar returns them to the caller as an
entry of their own; no image tool gives them meaning for a rootfs).
A ustar prefix is read as Go reads it: 155 bytes, 131 in star headers (trailer "tar"), and in a
GNU header whose atime/ctime fields are not numbers (Go < 1.8 wrote a prefix there).
Name precedence is Go's (hence umoci's): GNU.sparse.name, GNU long name ('L'), PAX path,
the header; likewise GNU long link, PAX linkpath, the header. A second 'x' header before one
entry replaces the first. Numbers beyond int64, times whose seconds do not fit int64 (their
nanoseconds need not: years before 1678 and after 2262 are kept exact),
name components over 255 bytes, symlink targets over 4095 bytes, NUL in a PAX keyword and
xattrs over Linux's limits (name 255, value 64 KiB) are errors; xattrs outside the user/
trusted/security/system namespaces are dropped (setxattr: ENOTSUP, which umoci skips), so are
trusted.overlay.* (overlayfs' own metadata, which must not come from an image); user.*
xattrs on anything but a file or directory are errors (Linux refuses them, so does umoci).
Unknown typeflags are regular files, as POSIX says ("shall be treated as a regular file"),
except the vendor range 'A'..'Z' (Solaris 'X' extended headers, ACL records...): those are
refused, as by containerd and umoci, rather than planted as stray files. GNU 'V' (volume
label) is skipped; 'M'/'N' (multi-volume, old long names) are refused.
Header-only types (hardlink, symlink, char, block, dir, fifo) carry no data even when their
size field is non-zero: like Go's archive/tar (so umoci, containerd), the next header follows.

End of archive: two zero blocks; a single zero block then EOF, or EOF at a clean member
boundary with no zero blocks at all, are accepted (GNU tar and Go/umoci accept both). A zero
block followed by a non-zero block is an error (as Go). Bytes after the end marker are read
and discarded (so the stream's digest can still be verified), like umoci.

Path policy (umoci: oci/layer/tar_extract.go UnpackEntry, CleanPath, SecureJoin):

| entry name                     | umoci                                  | nydus-py                       |
|--------------------------------|----------------------------------------|--------------------------------|
| `/abs/path`, `./rel`           | made relative to the root (CleanPath)  | same: `abs/path`, `rel`        |
| `a/./b`, `a//b`, trailing `/`  | cleaned                                | same: `a/b`                    |
| `a/../b` (stays inside)        | cleaned lexically → `b`                | same                           |
| `../../etc/passwd`, `/../x`    | silently re-rooted → `etc/passwd`      | LayerError: escapes the root   |
| `./`, `/`, `.`                 | the root directory                     | same: path `()`                |
| empty name                     | CleanPath("") → the root               | LayerError                     |
| NUL inside (PAX path)          | fails in the syscall (EINVAL)          | LayerError                     |
| hardlink target escaping       | re-rooted (CleanPath + SecureJoin)     | LayerError                     |
| hardlink target (inside)       | cleaned lexically                      | same → `link_path`             |
| symlink target                 | kept verbatim; empty fails (ENOENT)    | same (`linkname`); empty → err |
| `d/.wh.X`                      | whiteout of `d/X`                      | WHITEOUT, path `d/X`           |
| `d/.wh..wh..opq`               | opaque directory `d`                   | OPAQUE, path `d`               |
| `d/.wh..wh.plnk` (AUFS meta)   | whiteout of `d/.wh.plnk` (no-op)       | skipped                        |
| `d/.wh.`, `d/.wh..`            | whiteout of `d` itself (!)             | LayerError                     |

Parent components that are symlinks (resolved inside the root, as umoci and containerd do) or
files are the tree's business (converter/tree.py). For names that escape with `..` we prefer
a clear error to re-rooting: an image whose layer names paths outside its root was produced by
a broken or hostile tool, and a conversion pipeline should say so rather than produce a
different image than the one the user thinks they have.
"""

from converter.tar.entry import EntryKind, TarEntry, show, st_mode
from converter.tar.headers import parse_pax, parse_pax_time
from converter.tar.paths import normalize
from converter.tar.reader import iter_entries

__all__ = ["EntryKind", "TarEntry", "iter_entries", "normalize", "parse_pax", "parse_pax_time", "show",
           "st_mode"]
