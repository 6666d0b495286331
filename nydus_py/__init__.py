"""nydus-py: a lazy-loading container image filesystem."""

# The one place the version lives: pyproject.toml reads it (setuptools dynamic version), the
# CLIs, the API and the registry User-Agent import it (importlib.metadata costs ~55 ms at start).
__version__ = "0.1.0"
