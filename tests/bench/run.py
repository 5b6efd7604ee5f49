"""``make bench``: run every benchmark module (tests/bench/bench_*.py), print and save the figures.

Each module exposes ``main(out_dir: Path) -> dict``. Figures go to bench-out/results.json.
Speed targets live here, not in timed tests.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

BENCHES = ["bench_edge", "bench_multicam", "bench_hub", "bench_soak", "bench_delivery", "bench_dashboard",
           "bench_update", "bench_grpc_tls", "bench_trainer"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--only", action="append", help="run only these benchmarks (e.g. bench_edge)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    failed = []
    for name in args.only or BENCHES:
        try:
            mod = importlib.import_module(f"tests.bench.{name}")
        except ModuleNotFoundError as exc:
            print(f"== {name}: not available ({exc})")
            continue
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        try:
            results[name] = mod.main(args.out / name)
        except Exception:  # noqa: BLE001 - report and go on with the other benchmarks
            traceback.print_exc()
            failed.append(name)
            continue
        print(f"   ({time.monotonic() - t0:.1f} s)")
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"figures written to {args.out / 'results.json'}")
    if failed:
        print(f"benchmarks that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
