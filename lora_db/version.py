"""The package version, read by pyproject.toml (one place) and written into adapter metadata and model cards."""

__version__ = "0.1.0"
