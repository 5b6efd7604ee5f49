"""tegrastats: recorded lines of a Nano (R32) and Orin boards (R36) parsed, lines with fields missing, the
reader running a tegrastats, and the readings in the MQTT telemetry and /metrics (Python 3.8 too)."""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path
from typing import List

import pytest

from edge.config import EdgeConfig
from edge.telemetry.service import EPHEMERAL_PORT, Stats, TelemetryService
from edge.telemetry.tegrastats import TegrastatsReader, find_tegrastats, parse
from proto import kestrel_pb2, topics
from tests.edge.conftest import publisher_for
from tests.helpers.mqtt import Collector
from tests.helpers.wait import wait_for

DATA = Path(__file__).resolve().parent / "data"


def recorded(name: str) -> List[str]:
    return [ln for ln in (DATA / name).read_text().splitlines() if ln.strip() and not ln.startswith("#")]


NANO = recorded("tegrastats-nano-r32.txt")
ORIN = recorded("tegrastats-orin-r36.txt")


def test_every_recorded_line_gives_ram_cpu_temperatures_and_power() -> None:
    assert len(NANO) == 3 and len(ORIN) == 3
    for line in NANO + ORIN:
        s = parse(line)
        assert s.ram_used_mb and s.ram_total_mb and s.ram_used_mb < s.ram_total_mb, line
        assert len(s.cpu_core_load_pct) in (4, 6) and s.gpu_load_pct is not None, line
        assert "cpu" in s.temperature_c and "gpu" in s.temperature_c, line
        assert s.power_mw and all(v >= 0 for v in s.power_mw.values()), line
        assert not ({"RAM", "SWAP", "IRAM"} & set(s.power_mw)), line  # "RAM 1923/3964MB" is not a rail


def test_nano_r32_line_as_root() -> None:
    s = parse(NANO[0])
    assert (s.ram_used_mb, s.ram_total_mb) == (1923, 3964)
    assert s.cpu_core_load_pct == [5.0, 4.0, 3.0, 6.0] and s.cpu_core_freq_mhz == [1224] * 4
    assert s.cpu_load_pct == pytest.approx(4.5)
    assert (s.emc_load_pct, s.emc_freq_mhz) == (0.0, 1600)
    assert (s.gpu_load_pct, s.gpu_freq_mhz) == (0.0, 76)
    assert s.temperature_c == {"pll": 37.0, "cpu": 40.0, "pmic": 50.0, "gpu": 40.0, "ao": 45.0, "thermal": 40.0}
    assert s.power_mw == {"POM_5V_IN": 1750, "POM_5V_GPU": 0, "POM_5V_CPU": 366}
    assert s.power_avg_mw["POM_5V_IN"] == 1628


def test_nano_r32_with_video_engines_and_as_a_normal_user() -> None:
    busy = parse(NANO[1])
    assert busy.emc_load_pct == 10.0 and busy.temperature_c["cpu"] == 60.5
    assert busy.power_mw["POM_5V_IN"] == 4520 and "NVENC" not in busy.power_mw  # "NVENC 716" is a clock
    user = parse(NANO[2])
    assert user.emc_load_pct == 0.0 and user.emc_freq_mhz is None  # the clocks need root
    assert user.gpu_load_pct == 0.0 and user.gpu_freq_mhz is None
    assert user.temperature_c["gpu"] == 23.5 and user.power_mw["POM_5V_CPU"] == 549


def test_orin_r36_lines() -> None:
    nano = parse(ORIN[0])
    assert (nano.ram_used_mb, nano.ram_total_mb) == (3645, 7620)
    assert nano.cpu_core_load_pct == [1.0, 1.0, 4.0, 1.0, 0.0, 0.0] and set(nano.cpu_core_freq_mhz) == {729}
    assert (nano.gpu_load_pct, nano.gpu_freq_mhz) == (0.0, 305)  # "GR3D_FREQ 0%@[305]"
    assert (nano.emc_load_pct, nano.emc_freq_mhz) == (0.0, 204)
    assert nano.temperature_c == {"cpu": 44.125, "soc2": 43.375, "soc0": 42.125, "gpu": 44.531, "tj": 44.531,
                                  "soc1": 43.156}
    assert nano.power_mw == {"VDD_IN": 2957, "VDD_CPU_GPU_CV": 486, "VDD_SOC": 1012}
    newer = parse(ORIN[1])  # no EMC_FREQ at all, the GPU load without its clock
    assert newer.emc_load_pct is None and newer.emc_freq_mhz is None
    assert newer.gpu_load_pct == 0.0 and newer.gpu_freq_mhz is None
    assert newer.temperature_c["soc1"] == 46.0 and newer.power_mw["VDD_SOC"] == 1446
    nx = parse(ORIN[2])  # two cores off, a second GPC, upper-case zones
    assert nx.cpu_core_load_pct == [11.0, 13.0, 9.0, 18.0, None, None]
    assert nx.cpu_load_pct == pytest.approx(12.75)  # the mean of the cores that are on
    assert (nx.gpu_load_pct, nx.gpu_freq_mhz) == (0.0, 305)  # GR3D_FREQ, not GR3D2_FREQ
    assert nx.temperature_c["cv0"] == 42.718 and nx.temperature_c["tj"] == 46.968


@pytest.mark.parametrize("line", [
    "",
    "tegrastats: command not found",
    NANO[0][:60],                      # cut off inside the CPU list: what arrived is kept
    ORIN[0].split(" CPU ")[0],         # only the date, RAM and SWAP
    "RAM 100/200MB CPU [off,off,off,off] VDD_IN 10mW/9mW/8mW",  # every core off; a 3-value rail (newer L4T)
])
def test_lines_with_fields_missing_give_what_is_there_and_nothing_else(line: str) -> None:
    s = parse(line)
    whole = parse(NANO[0])
    if not line or "not found" in line:
        assert s.empty and s.to_proto().ByteSize() == 0
        return
    assert not s.empty
    if line.startswith("RAM 100"):
        assert s.cpu_core_load_pct == [None] * 4 and s.cpu_load_pct is None
        assert s.power_mw == {"VDD_IN": 10} and s.gpu_load_pct is None and not s.temperature_c
        return
    assert s.ram_used_mb in (whole.ram_used_mb, 3645)
    assert s.gpu_load_pct is None and not s.temperature_c and not s.power_mw  # never guessed


def test_to_proto_leaves_missing_fields_absent() -> None:
    full = parse(ORIN[2], time_ms=123).to_proto()
    assert full.time_ms == 123 and full.HasField("gpu_freq_mhz") and full.gpu_freq_mhz == 305
    assert list(full.cpu_core_load_pct) == [11.0, 13.0, 9.0, 18.0, -1.0, -1.0]
    assert full.cpu_load_pct == pytest.approx(12.75) and full.power_mw["VDD_IN"] == 4915
    partial = parse(ORIN[1]).to_proto()
    assert not partial.HasField("emc_load_pct") and not partial.HasField("gpu_freq_mhz")
    assert partial.HasField("gpu_load_pct") and partial.gpu_load_pct == 0.0  # 0 % is a reading, not absent
    back = kestrel_pb2.JetsonStats.FromString(partial.SerializeToString())
    assert back.temperature_c["tj"] == pytest.approx(46.125) and not back.HasField("emc_freq_mhz")


def fake_tegrastats(tmp_path: Path, lines: List[str], exit_after: int = 0) -> Path:
    """A stand-in `tegrastats --interval MS` (NVIDIA's binary runs only on a Jetson): prints the recorded
    lines over and over at the interval it is asked for; with exit_after, exits after that many."""
    data = tmp_path / "lines.txt"
    data.write_text("\n".join(lines) + "\n")
    script = tmp_path / "tegrastats"
    script.write_text(f"""#!{sys.executable}
import itertools, sys, time
assert sys.argv[1] == "--interval", sys.argv
interval = int(sys.argv[2]) / 1000.0
lines = open({str(data)!r}).read().splitlines()
for n, line in enumerate(itertools.cycle(lines), 1):
    print(line, flush=True)
    if {exit_after} and n >= {exit_after}:
        break
    time.sleep(interval)
""")
    script.chmod(0o755)
    return script


def test_find_tegrastats_follows_the_setting(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_tegrastats("auto") is None and find_tegrastats("off") is None
    exe = fake_tegrastats(tmp_path, NANO)
    assert find_tegrastats("auto") == str(exe)
    assert find_tegrastats("off") is None and find_tegrastats("/opt/x/tegrastats") == "/opt/x/tegrastats"


def test_reader_keeps_the_latest_line_and_restarts_a_tegrastats_that_exits(tmp_path: Path) -> None:
    exe = fake_tegrastats(tmp_path, ORIN[:1], exit_after=2)
    reader = TegrastatsReader(str(exe), interval_ms=100, restart_s=0.1)
    reader.start()
    try:
        sample = wait_for(reader.latest, 20, what="a first tegrastats reading")
        assert sample.power_mw["VDD_IN"] == 2957 and sample.time_ms > 0
        wait_for(lambda: reader.starts >= 2 and reader.lines >= 3, 20, what="tegrastats started again")
    finally:
        reader.stop()


def test_readings_reach_the_mqtt_telemetry_and_metrics(broker, tmp_path: Path) -> None:  # noqa: ANN001
    dev = "tegra1"
    cfg = EdgeConfig()
    cfg.mqtt.host, cfg.mqtt.port = broker.host, broker.port
    cfg.mqtt.reconnect_min_s, cfg.mqtt.reconnect_max_s = 0.05, 0.3
    cfg.telemetry.interval_s = 0.1
    cfg.telemetry.tegrastats = str(fake_tegrastats(tmp_path, NANO[:1]))
    cfg.telemetry.tegrastats_interval_ms = 100
    col = Collector(broker.host, broker.port, [topics.telemetry(dev)], qos=0)
    pub = publisher_for(cfg, dev, tmp_path / "spool")
    svc = TelemetryService(cfg.telemetry, dev, Stats(), pub, metrics_port=EPHEMERAL_PORT)
    try:
        pub.start()
        svc.start()

        def with_jetson() -> object:
            for p in col.payloads("/telemetry"):
                t = kestrel_pb2.Telemetry.FromString(p)
                if t.HasField("jetson"):
                    return t
            return None

        t = wait_for(with_jetson, 20, what="a telemetry message with the Jetson readings")
        j = t.jetson
        assert j.ram_used_mb == 1923 and j.gpu_freq_mhz == 76 and j.emc_freq_mhz == 1600
        assert list(j.cpu_core_load_pct) == [5.0, 4.0, 3.0, 6.0] and j.temperature_c["cpu"] == 40.0
        assert j.power_mw["POM_5V_IN"] == 1750
        with urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        values = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
                  if ln and not ln.startswith("#")}
        assert values["kestrel_edge_tegra_up"] == 1
        assert values['kestrel_edge_tegra_power_watts{rail="POM_5V_IN"}'] == pytest.approx(1.75)
        assert values['kestrel_edge_tegra_temperature_celsius{sensor="gpu"}'] == 40.0
        assert values['kestrel_edge_tegra_cpu_load_percent{core="3"}'] == 6.0
        assert values["kestrel_edge_tegra_gpu_frequency_hertz"] == pytest.approx(76e6)
        assert values["kestrel_edge_tegra_ram_used_bytes"] == 1923 * 1024 * 1024
    finally:
        svc.stop()
        pub.stop(flush_timeout_s=0)
        col.close()
