"""nydus-py benchmark harness (see perf/README.md). Entry point: perf/bench.py via perf/run."""
