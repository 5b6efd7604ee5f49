"""NVIDIA's ``tegrastats`` on a Jetson: one text line in, one typed sample out; and a reader that runs it.

``parse(line)`` is pure and tolerant: tegrastats prints different fields on different boards and L4T
releases (a Nano on R32: ``CPU [5%@1224,...] EMC_FREQ 0%@1600 GR3D_FREQ 0%@76 ... CPU@40C ...
POM_5V_IN 1750/1628``; an Orin Nano on R36: ``... GR3D_FREQ 0%@[305] ... cpu@44.125C ... VDD_IN
2957mW/2957mW``), leaves out what needs root (``EMC_FREQ``'s frequency, newer releases drop the GPU
frequency) and may start with a date. A field that is not in the line stays ``None`` (or empty);
nothing is guessed. ``JetsonSample.to_proto()`` fills ``kestrel_pb2.JetsonStats``.

``TegrastatsReader`` runs ``tegrastats --interval N`` (when the binary is there: ``[telemetry]
tegrastats``), parses every line on its own thread and keeps the latest sample; a tegrastats that
exits is restarted after ``RESTART_S`` with one log line.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import subprocess
import threading
import time
from typing import Dict, List, Optional

from proto import kestrel_pb2
from proto.clock import now_ms

log = logging.getLogger(__name__)

RESTART_S = 30.0     # a tegrastats that exited is started again after this long
STALE_AFTER = 3.0    # a sample older than this many intervals is not reported (tegrastats hangs, or died)

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\](?:@(\d+))?")
_CORE = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)%(?:@(\d+))?|(off))\s*$")
_EMC = re.compile(r"\bEMC_FREQ (\d+(?:\.\d+)?)%(?:@(\d+))?")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+(?:\.\d+)?)%(?:@\[?(\d+)[^\s\]]*\]?)?")
_TEMP = re.compile(r"(?<![\w%@])([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?:/\d+(?:mW)?)?(?![\w/])")
_NOT_RAILS = {"RAM", "SWAP", "IRAM"}


@dataclasses.dataclass
class JetsonSample:
    """One tegrastats line. Loads in percent, frequencies in MHz, temperatures in degrees C, power in mW."""

    time_ms: int = 0
    ram_used_mb: Optional[int] = None
    ram_total_mb: Optional[int] = None
    cpu_core_load_pct: List[Optional[float]] = dataclasses.field(default_factory=list)  # None: core off
    cpu_core_freq_mhz: List[Optional[int]] = dataclasses.field(default_factory=list)
    gpu_load_pct: Optional[float] = None
    gpu_freq_mhz: Optional[int] = None
    emc_load_pct: Optional[float] = None
    emc_freq_mhz: Optional[int] = None
    temperature_c: Dict[str, float] = dataclasses.field(default_factory=dict)
    power_mw: Dict[str, int] = dataclasses.field(default_factory=dict)
    power_avg_mw: Dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def cpu_load_pct(self) -> Optional[float]:
        """Mean load of the cores that are on (None when the line had no CPU field or every core is off)."""
        on = [v for v in self.cpu_core_load_pct if v is not None]
        return sum(on) / len(on) if on else None

    @property
    def empty(self) -> bool:
        return (self.ram_used_mb is None and not self.cpu_core_load_pct and self.gpu_load_pct is None
                and self.emc_load_pct is None and not self.temperature_c and not self.power_mw)

    def to_proto(self) -> kestrel_pb2.JetsonStats:
        msg = kestrel_pb2.JetsonStats(time_ms=self.time_ms)
        for name in ("cpu_load_pct", "gpu_load_pct", "gpu_freq_mhz", "emc_load_pct", "emc_freq_mhz",
                     "ram_used_mb", "ram_total_mb"):
            value = getattr(self, name)
            if value is not None:
                setattr(msg, name, value)
        msg.cpu_core_load_pct.extend(-1.0 if v is None else v for v in self.cpu_core_load_pct)
        msg.temperature_c.update(self.temperature_c)
        msg.power_mw.update(self.power_mw)
        return msg


def parse(line: str, time_ms: int = 0) -> JetsonSample:
    """A JetsonSample from one tegrastats line; fields the line does not have stay empty."""
    s = JetsonSample(time_ms=time_ms)
    m = _RAM.search(line)
    if m:
        s.ram_used_mb, s.ram_total_mb = int(m.group(1)), int(m.group(2))
    m = _CPU.search(line)
    if m:
        shared_freq = int(m.group(2)) if m.group(2) else None  # the old "CPU [1%,2%]@102" form
        for item in m.group(1).split(","):
            core = _CORE.match(item)
            if core is None:
                continue  # a field this parser does not know: skip it rather than guess
            if core.group(3):
                s.cpu_core_load_pct.append(None)
                s.cpu_core_freq_mhz.append(None)
            else:
                s.cpu_core_load_pct.append(float(core.group(1)))
                s.cpu_core_freq_mhz.append(int(core.group(2)) if core.group(2) else shared_freq)
    m = _EMC.search(line)
    if m:
        s.emc_load_pct = float(m.group(1))
        s.emc_freq_mhz = int(m.group(2)) if m.group(2) else None
    m = _GR3D.search(line)
    if m:
        s.gpu_load_pct = float(m.group(1))
        s.gpu_freq_mhz = int(m.group(2)) if m.group(2) else None
    for name, value in _TEMP.findall(line):
        s.temperature_c[name.lower()] = float(value)
    for name, now, avg in _RAIL.findall(line):
        if name not in _NOT_RAILS:
            s.power_mw[name] = int(now)
            s.power_avg_mw[name] = int(avg)
    return s


def find_tegrastats(setting: str) -> Optional[str]:
    """The tegrastats to run for ``[telemetry] tegrastats`` ("auto": on PATH or None; "off": None)."""
    if setting == "off":
        return None
    if setting == "auto":
        return shutil.which("tegrastats")
    return setting


class TegrastatsReader:
    """Runs ``exe --interval interval_ms`` and keeps the latest parsed line (``latest()``)."""

    def __init__(self, exe: str, interval_ms: int, restart_s: float = RESTART_S) -> None:
        self.exe = exe
        self.interval_ms = interval_ms
        self.restart_s = restart_s
        self._lock = threading.Lock()
        self._latest: Optional[JetsonSample] = None
        self._latest_at = 0.0
        self._stop = threading.Event()
        self._proc: Optional[subprocess.Popen] = None
        self._thread: Optional[threading.Thread] = None
        self.lines = 0
        self.starts = 0

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="tegrastats", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(3)
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def latest(self) -> Optional[JetsonSample]:
        """The newest sample, or None when there is none younger than STALE_AFTER intervals."""
        with self._lock:
            if self._latest is None:
                return None
            if time.monotonic() - self._latest_at > STALE_AFTER * self.interval_ms / 1000.0:
                return None
            return self._latest

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._read_once()
                why = "exited"
            except OSError as exc:
                why = f"could not be started ({exc.strerror or exc})"
            if self._stop.is_set():
                return
            failures += 1
            if failures == 1:
                log.warning("tegrastats %s %s; Jetson readings are missing from telemetry until it runs "
                            "again (retrying every %.0fs)", self.exe, why, self.restart_s)
            self._stop.wait(self.restart_s)

    def _read_once(self) -> None:
        proc = subprocess.Popen([self.exe, "--interval", str(self.interval_ms)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True, bufsize=1)
        self._proc = proc
        self.starts += 1
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                sample = parse(line, now_ms())
                if sample.empty:
                    continue
                with self._lock:
                    self._latest, self._latest_at = sample, time.monotonic()
                    self.lines += 1
        finally:
            proc.stdout.close()
            if proc.poll() is None:
                proc.terminate()
            proc.wait()
