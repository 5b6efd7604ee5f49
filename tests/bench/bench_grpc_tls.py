"""The cost of the hub's authenticated gRPC on a device's download: FetchModel of a ~5 MB bundle (the
bench_update bundle: mobilenet_float + ~3.7 MB of calibration samples) through the device's own fetch
path (edge.updater.fetch.fetch_bundle: new channel per download, resumable part file, fsync, sha256),
over TLS with a certificate of the fleet CA and a token of role device, against the same hub's
plain-text loopback port ([grpc] plain_port) with the same token check. Both ports are served by one
in-process hub (registry + the token interceptor, hub/grpc_auth.py) on 127.0.0.1; rounds alternate.
No target: a figure for docs/security.md ("Costs").

Run: ``PYTHONPATH=. .venv/bin/python -m tests.bench.run --only bench_grpc_tls``.
"""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROUNDS = 7


def main(out_dir: Path) -> Dict[str, Any]:
    import shutil

    from edge.updater.fetch import fetch_bundle
    from hub import auth
    from hub.config import from_dict
    from hub.grpc_auth import GrpcAuth
    from hub.grpc_service import make_server
    from hub.registry import Registry, RegistryConfig
    from hub.security.enrol import Security
    from hub.store.sqlite import SqliteStore
    from proto.hubclient import HubClient
    from proto.hubcreds import Credentials
    from tests.bench.bench_update import _mobilenet_bundle
    from tests.helpers.bundles import make_keypair
    from tests.helpers.models import default_dir

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        kp = make_keypair(t)
        data = _mobilenet_bundle(default_dir(), kp, 1)
        (t / "hub" / "trust").mkdir(parents=True)
        shutil.copyfile(kp.pub_path, t / "hub" / "trust" / kp.pub_path.name)
        store = SqliteStore(t / "hub" / "hub.db")
        security = Security(from_dict({"hub": {"data_dir": str(t / "hub")}}))
        registry = Registry(store, RegistryConfig(), t / "hub")
        server, port, plain = make_server(registry, None, auth=GrpcAuth(lambda tok: auth.authenticate(store, tok)),
                                          tls=security.grpc_tls(), plain_port=0)
        server.start()
        token = auth.add_token(store, "bench-device", "device")
        with HubClient(f"127.0.0.1:{port}", 60, Credentials(token=auth.add_token(store, "bench", "admin"),
                                                             ca_pem=security.ca_file.read_bytes())) as c:
            c.push(data)
        tls = Credentials(token=token, ca_pem=security.ca_file.read_bytes(), ca_file=str(security.ca_file))
        clear = Credentials(token=token, plaintext=True)
        sha = hashlib.sha256(data).hexdigest()
        times: Dict[str, List[float]] = {"tls": [], "plain": []}
        try:
            for i in range(ROUNDS + 1):
                for kind, target, creds in (("tls", f"127.0.0.1:{port}", tls), ("plain", f"127.0.0.1:{plain}", clear)):
                    t0 = time.perf_counter()
                    part = fetch_bundle(target, "mobilenet", 1, downloads=t / "dl", sha256=sha, size=len(data),
                                        max_bundle_bytes=10 ** 9, creds=creds)
                    took = time.perf_counter() - t0
                    part.unlink()
                    if i:  # the first round warms caches (page cache, grpc's first channel)
                        times[kind].append(took)
        finally:
            server.stop(None)
            store.close()
    tls_s, plain_s = statistics.median(times["tls"]), statistics.median(times["plain"])
    mb = len(data) / 1e6
    res = {"bundle_mb": round(mb, 2), "rounds": ROUNDS, "fetch_tls_s": round(tls_s, 4),
           "fetch_plain_s": round(plain_s, 4), "tls_extra_ms": round((tls_s - plain_s) * 1000, 1),
           "tls_mb_per_s": round(mb / tls_s, 1), "plain_mb_per_s": round(mb / plain_s, 1),
           "all_tls_s": [round(x, 4) for x in times["tls"]], "all_plain_s": [round(x, 4) for x in times["plain"]]}
    print(f"   FetchModel of a {mb:.1f} MB bundle (device fetch path, token checked): TLS {tls_s * 1000:.0f} ms "
          f"({res['tls_mb_per_s']} MB/s), plain text {plain_s * 1000:.0f} ms ({res['plain_mb_per_s']} MB/s): "
          f"TLS adds {res['tls_extra_ms']} ms (median of {ROUNDS})")
    return res


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(main(Path(sys.argv[1] if len(sys.argv) > 1 else "bench-out/bench_grpc_tls")), indent=1))
