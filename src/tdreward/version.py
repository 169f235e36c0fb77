"""The package version, in one place (read by the package and by saved files)."""

__version__ = "0.2.0"
