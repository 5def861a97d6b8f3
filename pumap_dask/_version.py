"""The package version (one place; the package, model files and reports read it here)."""

__version__ = "0.1.0"
