"""Kestrel edge: the device daemon. Python 3.8+, never imports TensorFlow."""

__version__ = "0.1.0"
