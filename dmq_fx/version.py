"""The package version (a leaf module, so that saved files can record it without importing
the package's API)."""

__version__ = "0.1.0"
