"""nydus-py: a lazy-loading container image filesystem."""

__version__ = "0.1.0"
