"""``python -m demo --out DIR``: the whole Kestrel loop on one machine, offline, in well under a minute.

Keys -> hub (embedded Mosquitto + SQLite) -> signed bundles v1/v2 pushed and deployed over gRPC ->
edge daemon fetches, verifies, self-tests, switches, commits -> low-confidence frames back over
MQTT into the hub's store -> v2 -> fleet rollback -> labels -> export -> trainer ingest.
The orchestration lives in tests/e2e/loop.py (shared with tests/e2e/test_loop.py); see docs/demo.md.
"""
