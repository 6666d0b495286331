"""The one parser of configuration: a decoded JSON/TOML value → a typed, frozen dataclass.

`build(cls, value, where)` walks the dataclass's type hints: nested dataclasses, `list[X]`,
`tuple[X, ...]`, `dict[str, str]`, `X | None`, bool, int, float (an int is accepted) and str.
Field metadata adds what type hints cannot say:

    size=True            an int or a size string ("10G", "512Ki", "0x100000") → bytes
    min=N / gt=N         lower bound (inclusive / exclusive)
    choices=(...)        allowed values
    empty_is_none=True   "" / null mean "not set"
    none_if_empty=KEY    an object whose KEY is "" means "not set" (nydusd's `"proxy": {"url": ""}`)

A dataclass may name keys Nydus knows but nydus-py does not implement in a class attribute
`UNIMPLEMENTED: {key: why}`: such a key is accepted with a warning naming it (appended to the
`warnings` list passed in). Any other unknown key is a ConfigError with the dotted path and a
"did you mean" when a known key is close. `__post_init__` may raise ConfigError("field: …");
the message gets the dataclass's path in front.

Every error names the dotted path of the value (`device.backend.config.mirrors[0].host: …`).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, TypeVar
from urllib.parse import urlsplit

from nydus_py.errors import ConfigError

T = TypeVar("T")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str | int) -> int:
    """"1073741824", "0x100000", "512M", "10G", "1.5GiB", "64KB" → bytes (binary units, as
    Nydus's and Docker's size flags). Raises ValueError with the text on anything else."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")  # noqa: TRY004 (callers catch ValueError)
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    t = text.strip()
    if t.lower().startswith("0x"):
        try:
            return int(t, 16)
        except ValueError:
            raise ValueError(f"not a size: {text!r}") from None
    if t.startswith("-"):
        raise ValueError(f"size must not be negative: {text!r}")
    m = _SIZE_RE.match(t)
    if not m or (m.group(3) and m.group(3).upper() not in ("B", "IB")) or \
            (m.group(3).upper() == "IB" and not m.group(2)):
        raise ValueError(f"not a size: {text!r} (use bytes or K/M/G/T, e.g. 10G)")
    number, unit = m.group(1), m.group(2).upper()
    value = float(number) * _UNITS[unit] if "." in number else int(number) * _UNITS[unit]
    return int(value)


def split_host(value: str, default_scheme: str, what: str) -> tuple[str, str]:
    """(scheme, host[:port]) of "http://host:port" or "host:port"."""
    if "://" in value:
        u = urlsplit(value)
        if u.scheme not in ("http", "https") or not u.netloc or u.path not in ("", "/"):
            raise ConfigError(f"{what}: expected http(s)://host[:port] without a path")
        return u.scheme, u.netloc
    if not value or "/" in value:
        raise ConfigError(f"{what}: expected host[:port] or http(s)://host[:port]")
    return default_scheme, value


def join(where: str, key: object) -> str:
    return f"{where}.{key}" if where else str(key)


def json_type(v: object) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", tuple: "an array", dict: "an object",
            type(None): "null"}.get(type(v), type(v).__name__)


def expect_object(v: object, where: str) -> dict:
    if not isinstance(v, dict):
        raise ConfigError(f"{where or 'config'}: expected a JSON object, got {json_type(v)}")
    return v


def did_you_mean(key: str, known: typing.Iterable[str]) -> str:
    import difflib      # only for this error line (~3 ms of every start-up otherwise)
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_key(where: str, key: str, known: typing.Iterable[str]) -> ConfigError:
    known = list(known)
    return ConfigError(f"{join(where, key)}: unknown field{did_you_mean(key, known)} "
                       f"(known: {', '.join(known)})")


def check_keys(obj: dict, known: typing.Iterable[str], where: str,
               unimplemented: dict[str, str] | None = None,
               warnings: list[str] | None = None) -> None:
    """Every key of `obj` is known, or a Nydus key we name in a warning."""
    known = tuple(known)
    unimplemented = unimplemented or {}
    for k in obj:
        if k in known:
            continue
        if k in unimplemented:
            if warnings is not None:
                warnings.append(f"{join(where, k)}: not supported by nydus-py, ignored "
                                f"({unimplemented[k]})")
            continue
        raise unknown_key(where, k, known + tuple(unimplemented))


def build(cls: type[T], value: object, where: str = "", *, warnings: list[str] | None = None,
          skip: tuple[str, ...] = ()) -> T:
    """`value` (a decoded JSON/TOML object) → an instance of the config dataclass `cls`."""
    obj = expect_object(value, where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)  # type: ignore[arg-type]
              if f.name not in skip and f.init and not f.metadata.get("internal")}
    check_keys(obj, fields, where, getattr(cls, "UNIMPLEMENTED", None), warnings)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in obj:
            continue
        v = obj[name]
        if f.metadata.get("empty_is_none") and v in ("", None):
            continue
        key = f.metadata.get("none_if_empty")
        if key and isinstance(v, dict) and v.get(key) in ("", None):
            # nydusd writes `"proxy": {"url": ""}` for "no proxy"; the other keys must still be real
            sub = typing.get_args(hints[name])[0]
            check_keys(v, [g.name for g in dataclasses.fields(sub)], join(where, name),
                       getattr(sub, "UNIMPLEMENTED", None), warnings)
            continue
        kwargs[name] = _value(v, hints[name], join(where, name), f.metadata, warnings)
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{join(where, missing[0])}: required field missing")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{join(where, str(e))}" if where else str(e)) from None


def _value(v: object, tp: Any, where: str, meta: Any = None, warnings: list[str] | None = None) -> Any:
    meta = meta or {}
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if v is None else _value(v, args[0], where, meta, warnings)
    if dataclasses.is_dataclass(tp):
        return build(tp, v, where, warnings=warnings)  # type: ignore[arg-type]
    if origin in (list, tuple):
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{where}: expected a JSON array, got {json_type(v)}")
        item = typing.get_args(tp)[0]
        items = [_value(x, item, f"{where}[{i}]", None, warnings) for i, x in enumerate(v)]
        if meta.get("nonempty_items") and not all(items):
            raise ConfigError(f"{where}: expected non-empty strings")
        return tuple(items) if origin is tuple else items
    if origin is dict:
        obj = expect_object(v, where)
        if not all(isinstance(k, str) and isinstance(x, str) for k, x in obj.items()):
            raise ConfigError(f"{where}: expected an object of string values")
        return dict(obj)
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: expected true or false, got {json_type(v)}")
        return v
    if tp is int:
        if meta.get("size") and isinstance(v, str):
            try:
                v = parse_size(v)
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
        if isinstance(v, bool) or not isinstance(v, int):
            want = "an integer or a size like 10G" if meta.get("size") else "an integer"
            raise ConfigError(f"{where}: expected {want}, got {json_type(v)}")
        return _bounded(v, where, meta)
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {json_type(v)}")
        return _bounded(float(v), where, meta)
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{where}: expected a string, got {json_type(v)}")
        if meta.get("nonempty") and not v:
            raise ConfigError(f"{where}: expected a non-empty string")
        choices = meta.get("choices")
        if choices and v not in choices:
            raise ConfigError(f"{where}: must be one of {', '.join(map(repr, choices))}, not {v!r}"
                              f"{did_you_mean(v, choices)}")
        return v
    raise TypeError(f"config field {where}: unsupported type {tp!r}")  # a bug in the schema


def _bounded(v: float, where: str, meta: Any) -> Any:
    lo = meta.get("min")
    if lo is not None and v < lo:
        raise ConfigError(f"{where}: must be >= {lo}, not {v}")
    gt = meta.get("gt")
    if gt is not None and v <= gt:
        raise ConfigError(f"{where}: must be > {gt}, not {v}")
    return v


class FromDict:
    """`Cls.from_dict(value, where)`: the one parser, for dataclasses that want the shorthand."""

    @classmethod
    def from_dict(cls, value: object, where: str = "", *,
                  warnings: list[str] | None = None) -> typing.Self:
        return build(cls, value, where, warnings=warnings)
