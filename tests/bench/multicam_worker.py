"""One edge daemon in its own process, for tests/bench/bench_multicam.py.

``python -m tests.bench.multicam_worker CONFIG.json`` builds an :class:`edge.daemon.Daemon` from the edge
config in the JSON file, prints ``{"ready": true}``, waits for a line on stdin (the benchmark starts
several workers and then all of them at once), runs the daemon to its end and prints, one JSON object
per line: progress every PROGRESS_S (``t``: monotonic time, which every process on the machine shares;
``processed``; ``rss_kb``), then the result (pipeline start and end, frames, CPU seconds of the process,
peak RSS).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict

from edge import config
from edge.daemon import Daemon

PROGRESS_S = 0.2


def status_kb(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in kB (0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def emit(obj: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    cfg = config.from_dict(json.loads(Path(sys.argv[1]).read_text()))
    daemon = Daemon(cfg)
    emit({"ready": True, "rss_kb": status_kb("VmRSS")})
    sys.stdin.readline()  # go
    done = threading.Event()

    def progress() -> None:
        while not done.wait(PROGRESS_S):
            p = daemon.pipeline
            emit({"t": time.monotonic(), "processed": p.processed if p is not None else 0,
                  "rss_kb": status_kb("VmRSS")})

    watcher = threading.Thread(target=progress, daemon=True)
    watcher.start()
    c0 = time.process_time()
    code = daemon.run()
    cpu = time.process_time() - c0
    done.set()
    watcher.join(5)
    p = daemon.pipeline
    if code != 0 or p is None:
        emit({"error": f"the daemon exited with {code}"})
        return 1
    emit({"started_at": p.started_at, "ended_at": p.started_at + daemon.run_seconds(), "processed": p.processed,
          "captured": p.captured, "dropped": p.dropped, "errors": p.errors, "batches": p.batches,
          "sampled": daemon.stats.sampled, "spooled": daemon.sink_worker.spooled, "cpu_s": cpu,
          "inference_cpu_s": p.inference_cpu_s, "capture_cpu_s": p.capture_cpu_s,
          "rss_peak_kb": status_kb("VmHWM"), "rss_kb": status_kb("VmRSS"),
          "threads": getattr(daemon.holder.get(), "threads", 0) if daemon.holder.get() is not None else 0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
