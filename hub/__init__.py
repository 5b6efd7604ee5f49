"""Kestrel hub: MQTT ingest, storage, model registry and fleet over gRPC, HTTP."""

__version__ = "0.1.0"
