"""Rolling statistics, periodic telemetry messages over MQTT (edge.telemetry.service.service) and the
Prometheus /metrics endpoint (edge.telemetry.service.metrics)."""
