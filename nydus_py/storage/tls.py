"""`ca_cert_files` (nydusd's key): PEM files trusted in addition to the default CA store.

requests and botocore take one CA bundle path, which replaces their default store; so the
default store (certifi's, which both use) and the configured files are joined into one bundle
in a private temporary directory, removed at exit, one per distinct list of files.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading

from nydus_py.errors import ConfigError

_lock = threading.Lock()
_bundles: dict[tuple[str, ...], str] = {}


def ca_bundle(files: list[str] | tuple[str, ...]) -> str | None:
    """A path to default CAs + `files`, or None when `files` is empty (use the default)."""
    if not files:
        return None
    key = tuple(files)
    with _lock:
        path = _bundles.get(key)
        if path is not None and os.path.exists(path):
            return path
        pems = []
        for f in files:
            try:
                with open(f, "rb") as fh:
                    data = fh.read(4 << 20)
            except OSError as e:
                raise ConfigError(f"ca_cert_files: {f}: {e.strerror}") from None
            if b"-----BEGIN CERTIFICATE-----" not in data:
                raise ConfigError(f"ca_cert_files: {f}: no PEM certificate in it")
            pems.append(data)
        import certifi
        with open(certifi.where(), "rb") as fh:
            default = fh.read()
        d = tempfile.mkdtemp(prefix="nydus-py-ca-")
        atexit.register(shutil.rmtree, d, True)
        path = os.path.join(d, "bundle.pem")
        with open(path, "wb") as out:
            out.writelines(pem.rstrip(b"\n") + b"\n" for pem in [default, *pems])
        _bundles[key] = path
        return path
