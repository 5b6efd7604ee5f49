"""Kestrel's contracts: what the trainer, the hub and the device agree on, and nothing else.

* the wire: ``kestrel.proto`` (every MQTT payload and gRPC service) and its generated modules
  ``kestrel_pb2`` / ``kestrel_pb2_grpc``; the MQTT topics (``topics``); the hub's gRPC client
  (``hubclient``, used by kestrel-hub, kestrel-train, the demo and the device's download) and where
  its token and CA come from (``hubcreds``);
* the bundle: the signed container (``bundle_container``), its manifest (``manifest``), verification
  and staging (``bundle``), Ed25519 keys (``keys``), model names (``modelname``) and the model's
  input spec (``inputspec``);
* the shared kernel of all three programs: the typed TOML config loader (``tomlconf``), the error tree
  and exit codes (``errors``), atomic file writes (``atomic``), the clock (``clock``) and the
  reconnect backoff (``backoff``).

This package imports nothing from ``edge``, ``hub`` or ``trainer`` and installs on the device's
Python 3.8 with no TensorFlow (docs/adr/0010-contracts-package.md; tests/test_import_direction.py).
"""
