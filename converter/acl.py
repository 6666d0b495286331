"""POSIX ACL xattrs as Linux applies them when an unpacker sets them (fs/posix_acl.c).

setxattr(`system.posix_acl_access`) does more than store bytes: the value is checked (version
2, entries in tag order USER_OBJ, USER..., GROUP_OBJ, GROUP..., MASK, OTHER, a MASK whenever
there are named entries, only rwx bits), the file's permission bits become the ACL's (owner =
USER_OBJ, group = MASK if there is one, else GROUP_OBJ, other = OTHER), and an ACL that says no
more than those bits (no MASK, no named entries) is not stored at all. getxattr then returns
the stored ACL in canonical form (the id of an unnamed entry reads 0xFFFFFFFF). So an unpacker
(umoci, as root) produces exactly what `access_acl()` computes; the setuid/setgid/sticky bits are
left alone (root may keep setgid).
"""

from __future__ import annotations

import struct

ACCESS = b"system.posix_acl_access"
VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")


def access_acl(mode: int, value: bytes) -> tuple[int, bytes | None]:
    """(mode with the ACL's permission bits, the xattr value the kernel keeps or None) for an
    access ACL set on a file of `mode`. ValueError (the kernel's EINVAL) says why it is invalid.
    An ACL of another version is refused by the kernel with EOPNOTSUPP, which unpackers skip as
    they skip any unsupported xattr: it is dropped, the mode unchanged."""
    if len(value) < _HEADER.size:
        raise ValueError("shorter than its header")
    if _HEADER.unpack_from(value)[0] != VERSION:
        return mode, None
    if (len(value) - _HEADER.size) % _ENTRY.size:
        raise ValueError("size is not a whole number of entries")
    entries = [_ENTRY.unpack_from(value, off) for off in range(_HEADER.size, len(value), _ENTRY.size)]
    if not entries:
        return mode, None          # an empty ACL removes the ACL
    _check(entries)
    perms = 0
    named = False
    for tag, perm, _ in entries:
        if tag == USER_OBJ:
            perms |= perm << 6
        elif tag == GROUP_OBJ:
            perms |= perm << 3
        elif tag == OTHER:
            perms |= perm
        elif tag == MASK:
            perms = (perms & ~0o070) | (perm << 3)
            named = True
        else:
            named = True
    mode = (mode & ~0o777) | perms
    if not named:
        return mode, None          # equivalent to the mode: the kernel does not store it
    return mode, _HEADER.pack(VERSION) + b"".join(
        _ENTRY.pack(tag, perm, ident if tag in (USER, GROUP) else UNDEFINED_ID)
        for tag, perm, ident in entries)


def _check(entries: list[tuple[int, int, int]]) -> None:
    """posix_acl_valid(): tags in order, one of each unnamed kind, a mask when named entries exist."""
    state, needs_mask = USER_OBJ, False
    for tag, perm, ident in entries:
        if perm & ~0o7:
            raise ValueError(f"permission bits {perm:#o} beyond rwx")
        if tag in (USER, GROUP) and ident == UNDEFINED_ID:
            raise ValueError("a named entry without an id")
        if tag == USER_OBJ and state == USER_OBJ:
            state = USER
        elif tag == USER and state == USER:
            needs_mask = True
        elif tag == GROUP_OBJ and state == USER:
            state = GROUP
        elif tag == GROUP and state == GROUP:
            needs_mask = True
        elif tag == MASK and state == GROUP:
            state = OTHER
        elif tag == OTHER and (state == OTHER or (state == GROUP and not needs_mask)):
            state = 0
        else:
            raise ValueError(f"entry tag {tag:#x} out of order, repeated or unknown")
    if state != 0:
        raise ValueError("missing the owner, group or other entry")
