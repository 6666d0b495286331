"""The `nydusd` console script: starts reading ahead the daemon's own files (a cold page cache
costs ~0.15 s of every mount-ready, daemon/startup_files.py), then runs the CLI. Kept apart
from daemon/cli.py so that importing the CLI (tests, the fork server) starts nothing."""

from __future__ import annotations


def main() -> int:
    from nydus_py.daemon import startup_files
    startup_files.start()
    from nydus_py.daemon.cli import main as cli_main
    return cli_main()
