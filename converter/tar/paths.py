"""Path policy: entry names → path components (see the table in converter/tar/__init__.py)."""

from __future__ import annotations

NAME_MAX = 255      # one name component (Linux)


def normalize(name: bytes) -> tuple[bytes, ...]:
    """Name → components (policy in the module docstring); ValueError says why not."""
    if not name:
        raise ValueError("has an empty name")
    if b"\0" in name:
        raise ValueError("has a NUL byte in its name")
    parts: list[bytes] = []
    for c in name.split(b"/"):
        if c == b"" or c == b".":
            continue
        if c == b"..":
            if not parts:
                raise ValueError("escapes the image root")
            parts.pop()
        elif len(c) > NAME_MAX:
            raise ValueError(f"has a name component longer than {NAME_MAX} bytes")
        else:
            parts.append(c)
    return tuple(parts)

