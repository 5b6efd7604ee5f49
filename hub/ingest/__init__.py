"""MQTT in, store out: the frames, telemetry and status the fleet publishes, checked, batched and
committed, then acknowledged.

* hub.ingest.service: ``Ingest``, what ``kestrel-hub serve`` runs: the link feeding the pipeline;
* hub.ingest.mqttlink: the MQTT connection (connect, subscribe, reconnect with proto.backoff, acks);
  hub.ingest.pahohooks: the two private paho hooks it uses (ADR 0011);
* hub.ingest.pipeline: the batch pipeline (validate, stage, commit threads), with hub.ingest.message
  (the interface between the two), hub.ingest.parse and hub.ingest.imagecheck (checking a message),
  hub.ingest.devices (which devices may send), hub.ingest.batchwrite (one batch into the store, poison
  frames), hub.ingest.deadletter (refused frames set aside) and hub.ingest.stats (its counters)."""
