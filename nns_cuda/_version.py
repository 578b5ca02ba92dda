"""The package version (a leaf: imported by the facade and the application layer)."""
__version__ = "0.1.0"
