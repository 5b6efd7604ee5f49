"""Kestrel trainer: image folders to pruned, int8, evaluated, signed model bundles."""

__version__ = "0.1.0"
