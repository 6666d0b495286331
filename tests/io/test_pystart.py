"""io/pystart.py: the files a CPython reads while it starts, found in an image from the path of
the interpreter (version from its name, library beside its directory), bounded."""

from __future__ import annotations

from nydus_py.format.bootstrap import Bootstrap
from nydus_py.io import pystart
from nydus_py.io.elfdeps import lookup_path
from tests.fixtures.nydus_build import build

LIB = "usr/lib/python3.11"


def _debian(extra: dict[str, bytes] | None = None, symlinks: dict[str, bytes] | None = None) -> Bootstrap:
    """A Debian-like python3.11: sources and bytecode, sitecustomize symlinked to /etc."""
    files = {"usr/bin/python3.11": b"\x7fELF" + bytes(60),
             "etc/python3.11/sitecustomize.py": b"# debian\n",
             f"{LIB}/os.py": b"os" * 100,
             f"{LIB}/encodings/latin_1.py": b"latin"}
    for mod in ("encodings/__init__", "encodings/aliases", "encodings/utf_8"):
        d, _, base = mod.rpartition("/")
        files[f"{LIB}/{mod}.py"] = mod.encode() * 3
        files[f"{LIB}/{d}/__pycache__/{base}.cpython-311.pyc"] = b"pyc " + mod.encode()
    files.update(extra or {})
    links = {"usr/bin/python3": b"python3.11", "lib": b"usr/lib",
             f"{LIB}/sitecustomize.py": b"/etc/python3.11/sitecustomize.py", **(symlinks or {})}
    return Bootstrap.from_bytes(build(files, symlinks=links).bootstrap)


def _paths(bs: Bootstrap, inos: list[int]) -> list[str]:
    return [bs.path_of(i) for i in inos]


def test_a_debian_python_start_is_predicted_file_for_file():
    bs = _debian()
    got = _paths(bs, pystart.startup_files(bs, b"/usr/bin/python3.11"))
    assert got == [f"/{LIB}/encodings/__pycache__/__init__.cpython-311.pyc", f"/{LIB}/encodings/__init__.py",
                   f"/{LIB}/encodings/__pycache__/aliases.cpython-311.pyc", f"/{LIB}/encodings/aliases.py",
                   f"/{LIB}/encodings/__pycache__/utf_8.cpython-311.pyc", f"/{LIB}/encodings/utf_8.py",
                   "/etc/python3.11/sitecustomize.py"]     # found through the image's symlink
    # frozen from 3.11 on, so not read: os.py stays out; so do codecs nobody asked for
    assert f"/{LIB}/os.py" not in got and f"/{LIB}/encodings/latin_1.py" not in got


def test_the_interpreter_is_recognised_by_name_only_with_its_library_in_the_image():
    bs = _debian()
    assert pystart.version_of(b"/usr/bin/python3.11", bs) == (3, 11, b"/usr/lib/python3.11")
    # `python3` as the real file: the one versioned library beside it
    assert pystart.version_of(b"/usr/bin/python3", bs) == (3, 11, b"/usr/lib/python3.11")
    for other in (b"/usr/bin/perl", b"/usr/bin/python3.11-config", b"/usr/bin/python3.12",
                  b"/opt/bin/python3.11", b"/usr/bin/xpython3.11"):
        assert pystart.version_of(other, bs) is None, other
        assert pystart.startup_files(bs, other) == [], other
    two = _debian({"usr/lib/python3.12/encodings/__init__.py": b"x"})
    assert pystart.version_of(b"/usr/bin/python3", two) is None          # which one: unknown
    assert pystart.version_of(b"/usr/bin/python3.12", two) == (3, 12, b"/usr/lib/python3.12")


def test_an_older_python_also_reads_what_later_ones_freeze_and_lib64_is_searched():
    files = {"usr/local/bin/python3.9": b"\x7fELF",
             "usr/local/lib64/python3.9/encodings/__init__.py": b"enc",
             "usr/local/lib64/python3.9/os.py": b"os",
             "usr/local/lib64/python3.9/__pycache__/site.cpython-39.pyc": b"site pyc",
             "usr/local/lib64/python3.9/site.py": b"site"}
    bs = Bootstrap.from_bytes(build(files).bootstrap)
    got = _paths(bs, pystart.startup_files(bs, b"/usr/local/bin/python3.9"))
    assert got == ["/usr/local/lib64/python3.9/encodings/__init__.py", "/usr/local/lib64/python3.9/os.py",
                   "/usr/local/lib64/python3.9/__pycache__/site.cpython-39.pyc",
                   "/usr/local/lib64/python3.9/site.py"]


def test_pth_files_of_the_site_directories_bounded_in_number_and_size():
    pth = {f"usr/local/lib/python3.11/dist-packages/{i:02d}.pth": b"# pth\n" for i in range(pystart.MAX_PTH + 4)}
    bs = _debian({**pth,
                  "usr/lib/python3/dist-packages/debian.pth": b"import x\n",
                  "usr/lib/python3/dist-packages/module.py": b"x = 1\n",
                  f"{LIB}/site-packages/big.pth": b"#" * (pystart.MAX_FILE + 1),
                  f"{LIB}/site-packages/empty.pth": b""})
    got = _paths(bs, pystart.startup_files(bs, b"/usr/bin/python3.11"))
    taken = [p for p in got if p.endswith(".pth")]
    assert taken == ["/usr/lib/python3/dist-packages/debian.pth",
                     *[f"/usr/local/lib/python3.11/dist-packages/{i:02d}.pth" for i in range(pystart.MAX_PTH)]]
    assert not any(p.endswith("module.py") for p in got)


def test_hostile_trees_cost_the_prediction_only():
    # the library is a file, a symlink loop, or a link out of the image root: nothing predicted
    for links in ({"usr/lib/python3.11/encodings": b"encodings"},
                  {"usr/lib/python3.11/encodings": b"../../../../../../../etc"}):
        files = {"usr/bin/python3.11": b"x", "usr/lib/python3.11/os.py": b"os"}
        bs = Bootstrap.from_bytes(build(files, symlinks=links).bootstrap)
        assert pystart.startup_files(bs, b"/usr/bin/python3.11") == []
    bs = Bootstrap.from_bytes(build({"usr/bin/python3.11": b"x", "usr/lib/python3.11": b"a file"}).bootstrap)
    assert pystart.startup_files(bs, b"/usr/bin/python3.11") == []
    assert lookup_path(bs, b"/usr/lib/python3.11") is not None


def test_a_bad_record_on_the_way_means_no_prediction(monkeypatch):
    from nydus_py.errors import FormatError
    bs = _debian({"usr/lib/python3/dist-packages/x.pth": b"#"})

    def bad(ino, start=0):
        raise FormatError("bootstrap: dirent beyond the table")
    monkeypatch.setattr(bs, "readdir", bad)
    assert pystart.startup_files(bs, b"/usr/bin/python3") == []      # lists <prefix>/lib
    assert pystart.startup_files(bs, b"/usr/bin/python3.11") == []   # lists the site dirs
