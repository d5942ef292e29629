"""blocklowrank: structured low-rank matrix approximation."""

__version__ = "0.1.0"
