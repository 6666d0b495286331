"""Prefetch planning, the token bucket, FileReader.prefetch under its own limiter with
single-flight, the API server's HTTP handling, and the supervisor's metric merging; no mount."""

from __future__ import annotations

import os
import random

import pytest
import trio
import trio.testing

from nydus_py.cache.chunk_cache import ChunkCache
from nydus_py.daemon import api
from nydus_py.config import parse
from nydus_py.daemon.supervisor import merge_sum
from nydus_py.errors import ConfigError
from nydus_py.format.bootstrap import Bootstrap
from nydus_py.io import prefetch as pf
from nydus_py.io.reader import FileReader
from nydus_py.metrics import Metrics
from nydus_py.storage.localfs import LocalFsBackend
from nydus_py.storage.wrappers import MeteredBackend
from tests.fixtures.nydus_build import build

CS = 4096


@pytest.fixture
def image(tmp_path):
    files = {"a/x": random.Random(1).randbytes(3 * CS), "a/y": random.Random(2).randbytes(CS + 5),
             "b/z": random.Random(3).randbytes(2 * CS), "b/dup": random.Random(1).randbytes(3 * CS)}
    b = build(files, chunk_size=CS, compressor="none")
    b.write(tmp_path / "blobs", tmp_path / "bootstrap")
    return tmp_path, b, Bootstrap.from_bytes(b.bootstrap)


def test_plan_resolves_paths_and_directories_dedups_chunks_and_sorts_by_offset(image):
    _, _, bs = image
    p = pf.plan(bs, paths=["/b", "/a/x", "/missing"])
    assert sorted(bs.path_of(i) for i in p.inodes) == ["/a/x", "/b/dup", "/b/z"]
    assert len(p.chunks) == 5                          # b/dup's chunks are a/x's
    assert [c.comp_offset for c in p.chunks] == sorted(c.comp_offset for c in p.chunks)
    assert len(pf.plan(bs, prefetch_all=True).chunks) == 3 + 2 + 2
    assert pf.plan(bs).chunks == ()


def test_token_bucket_paces_bytes():
    async def main():
        bucket = pf.TokenBucket(1000, 100)
        t0 = trio.current_time()
        for _ in range(10):
            await bucket.take(500)
        return trio.current_time() - t0
    took = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert 4.8 <= took <= 5.0                       # 5000 bytes at 1000 B/s, 100 B of burst


def test_reader_prefetch_uses_its_own_limiter_and_foreground_shares_flights(image):
    tmp, built, bs = image
    m = Metrics()
    backend = MeteredBackend(LocalFsBackend(tmp / "blobs"), m.backend)
    cache = ChunkCache(tmp / "cache", metrics=m)
    fg = trio.CapacityLimiter(1)
    reader = FileReader(bs, backend, cache, limiter=fg, metrics=m, amplify_io=0)
    reader.open_blobs()

    async def main():
        async with fg:                                # foreground slots all taken...
            p = pf.Prefetcher(reader, bs, prefetch_all=True, metrics=m, threads_count=2)
            with trio.fail_after(5):
                await p.run()                        # ...prefetch still completes
        snap = m.group("prefetch").snapshot()
        assert snap["state"] == pf.DONE and snap["fetched_chunks"] == 7 and snap["errors"] == 0
        before = m.backend.value("read_count")
        ino = bs.lookup(bs.lookup(1, b"a"), b"x")
        assert await reader.read(ino, 0, 3 * CS) == built.files["a/x"]
        assert m.backend.value("read_count") == before
        assert await reader.prefetch(list(pf.plan(bs, prefetch_all=True).chunks),
                                     limiter=trio.CapacityLimiter(1), merging_size=1 << 20) == (0, 0)
    trio.run(main)


def test_config_accepts_max_size_and_rejects_negative_prefetch_values():
    cfg = parse({"device": {"cache": {"type": "blobcache", "config": {"work_dir": "/c", "max_size": 1 << 30}}},
                 "fs_prefetch": {"enable": True, "bandwidth_rate": 1000}})
    assert cfg.cache.max_size == 1 << 30 and cfg.fs_prefetch.bandwidth_rate == 1000
    with pytest.raises(ConfigError, match="fs_prefetch.bandwidth_rate"):
        parse({"fs_prefetch": {"bandwidth_rate": -1}})


def test_api_server_parses_requests_and_answers_errors(tmp_path):
    sock = str(tmp_path / "api.sock")
    seen = []

    async def handler(req: api.Request) -> api.Response:
        seen.append(req)
        if req.path == "/boom":
            raise RuntimeError("bug")
        if req.path == "/bad":
            raise api.ApiError(409, "Conflict", "nope")
        return api.json_response({"method": req.method, "query": req.query, "body": req.json()})

    results = {}

    def client():
        results["ok"] = api.get_json(sock, "/x?a=1&b=two", "POST", {"k": [1, 2]})
        results["bad"] = api.get_json(sock, "/bad")
        results["boom"] = api.get_json(sock, "/boom")
        results["json"] = api.call_sync(sock, "PUT", "/y", b"{not json")
        import socket
        with socket.socket(socket.AF_UNIX) as s:       # garbage request line
            s.connect(sock)
            s.sendall(b"HELLO\r\n\r\n")
            results["garbage"] = s.recv(1000)

    async def main():
        async with trio.open_nursery() as n:
            await n.start(api.serve_unix, sock, handler)
            await trio.to_thread.run_sync(client)
            n.cancel_scope.cancel()
    trio.run(main)
    assert results["ok"] == (200, {"method": "POST", "query": {"a": "1", "b": "two"}, "body": {"k": [1, 2]}})
    assert results["bad"] == (409, {"code": "Conflict", "message": "nope"})
    assert results["boom"][0] == 500 and "bug" in results["boom"][1]["message"]
    assert results["json"][0] == 400
    assert results["garbage"].startswith(b"HTTP/1.1 400")
    assert not (tmp_path / "api.sock").exists()          # removed when the server stops


def test_the_api_socket_appears_only_once_it_listens(tmp_path, monkeypatch):
    """bind() under a temporary name, listen, then rename: whoever sees the path can connect
    (a client polling for it used to get ECONNREFUSED between bind and listen)."""
    import stat
    sock = str(tmp_path / "api.sock")
    seen = {}
    real_chmod = os.chmod

    def chmod(p, mode, **kw):           # between bind and listen
        seen["path_before_listen"] = os.path.exists(sock)
        seen["entries"] = sorted(os.listdir(tmp_path))
        return real_chmod(p, mode, **kw)
    monkeypatch.setattr(api.os, "chmod", chmod)

    async def handler(req):
        return api.json_response({})

    async def main():
        async with trio.open_nursery() as n:
            await n.start(api.serve_unix, sock, handler)
            st = os.lstat(sock)
            seen["mode"] = stat.S_IMODE(st.st_mode)
            seen["answer"] = await trio.to_thread.run_sync(api.get_json, sock, "/")
            seen["after"] = sorted(os.listdir(tmp_path))
            n.cancel_scope.cancel()
    trio.run(main)
    assert seen["path_before_listen"] is False and len(seen["entries"]) == 1
    assert seen["entries"][0].endswith(".sock") and seen["entries"][0].startswith(".")
    assert seen["mode"] == 0o600 and seen["answer"] == (200, {})
    assert seen["after"] == ["api.sock"]                 # nothing else left behind
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("answer", [b"", b"garbage"])
def test_a_daemon_closing_without_a_response_is_a_connection_error(tmp_path, answer):
    """A daemon exiting mid-request (e.g. a hot upgrade) answers nothing: callers catch OSError."""
    import socket
    import threading
    path = str(tmp_path / "api.sock")
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(path)
        srv.listen(1)

        def close_after_reading() -> None:
            c, _ = srv.accept()
            with c:
                c.recv(65536)
                c.sendall(answer)
        t = threading.Thread(target=close_after_reading)
        t.start()
        with pytest.raises(ConnectionError, match="no HTTP response"):
            api.get_json(path, "/api/v1/daemon")
        t.join()


def test_merge_sum_adds_numbers_and_histograms():
    a = {"read_count": 2, "lat": {"le": [0.1, "+Inf"], "counts": [1, 1], "sum": 0.5}, "id": "a", "on": True}
    b = {"read_count": 3, "lat": {"le": [0.1, "+Inf"], "counts": [0, 2], "sum": 1.0}, "id": "b", "on": True}
    assert merge_sum(a, b) == {"read_count": 5, "lat": {"le": [0.1, "+Inf"], "counts": [1, 3], "sum": 1.5},
                               "id": "a", "on": True}
