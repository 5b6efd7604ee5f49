"""``kestrel-hub loadgen``: simulated devices sending real frame messages to a hub through its broker, to load a
deployment and count what it lost or stored twice (docs/hub.md, *Load generator*).

* :mod:`hub.loadgen.frames`: JPEG images of about the asked size and the ``Frame`` messages carrying them
  (frame id ``<run>-<device>-<seq>``: per-device sequence numbers, so loss and duplicates can be counted);
* :mod:`hub.loadgen.device`: one simulated device, its own MQTT 3.1.1 connection (TLS and credentials as
  enrolled devices have them), QoS 1, reconnects with proto.backoff, and the device side of storage
  receipts: a frame is done only when a hub's receipt names it, resent after the receipt timeout
  (doubling) or at once on a hub's ResendRequest;
* :mod:`hub.loadgen.runner`: N devices at F frames/s for a duration, then a drain; the figures;
* :mod:`hub.loadgen.storecheck`: what the store holds of the run (lost, stored twice).
"""
