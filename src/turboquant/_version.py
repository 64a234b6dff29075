"""The package version, in one place (``turboquant.__version__``, manifests, checkpoints, release keys)."""

__version__ = "0.1.0"
