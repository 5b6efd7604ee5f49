"""``kestrel-hub loadgen`` as a subprocess (``python -m hub loadgen ... --json --records FILE``), for the hub's
scale-out tests and the soak benchmark: its summary, its per-frame records and its exit status."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]


class Loadgen:
    def __init__(self, out: Path, *args: str) -> None:
        """``args``: loadgen options (--host/--port or --config, --devices, --fps, --duration, ...)."""
        self.records_path = out / "loadgen-records.csv"
        self.log_path = out / "loadgen.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen([sys.executable, "-m", "hub", "loadgen", "--json", "--records",
                                      str(self.records_path), *args], cwd=str(REPO),
                                     env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                                     stderr=self._log)
        self.rc: Optional[int] = None
        self.summary: Dict[str, Any] = {}

    def wait(self, timeout: float = 120.0) -> Dict[str, Any]:
        out, _ = self.proc.communicate(timeout=timeout)
        self._log.close()
        self.rc = self.proc.returncode
        try:
            self.summary = json.loads(out)
        except ValueError as exc:
            raise AssertionError(f"loadgen exited {self.rc} without a summary: {out!r}\n"
                                 f"{self.log_path.read_text()[-3000:]}") from exc
        return self.summary

    def records(self) -> List[Dict[str, Any]]:
        """One dict per frame: device, seq, publish_s, sends, committed_ms, receipt_s (None: never receipted),
        hub_id, refused."""
        out = []
        with open(self.records_path, newline="") as f:
            for r in csv.DictReader(f):
                out.append({"device": r["device"], "seq": int(r["seq"]), "publish_s": float(r["publish_s"]),
                            "sends": int(r["sends"]), "committed_ms": int(r["committed_ms"]),
                            "receipt_s": float(r["receipt_s"]) if r["receipt_s"] else None,
                            "hub_id": r["hub_id"], "refused": r["refused"]})
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if not self._log.closed:
            self._log.close()
