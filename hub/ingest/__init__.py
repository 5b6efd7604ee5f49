"""MQTT in, store out: the frames, telemetry and status the fleet publishes, checked, batched and
committed (hub.ingest.pipeline), parsed and validated (hub.ingest.parse, hub.ingest.imagecheck),
set aside when refused (hub.ingest.deadletter)."""
