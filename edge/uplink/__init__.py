"""Everything after a frame is chosen: JPEG encoding off the inference thread (edge.uplink.sink),
the durable on-disk spool (edge.uplink.spool), the publisher that drains it at QoS 1 with status and
telemetry (edge.uplink.publisher) and the MQTT connection under it (edge.uplink.mqtt)."""
