"""Stats math with an injected clock, the Prometheus endpoint, telemetry over MQTT."""

from __future__ import annotations

import threading
import urllib.request
from pathlib import Path
from typing import Dict, List

import pytest

from edge.config import EdgeConfig
from edge.telemetry.service import EPHEMERAL_PORT, Stats, TelemetryService, percentile
from proto import kestrel_pb2, topics
from tests.edge.conftest import publisher_for
from tests.helpers.mqtt import Collector
from tests.helpers.wait import wait_for


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_stats_count_low_confidence_and_histogram_top_scores() -> None:
    """Every inferred frame's top-1 score goes into one of SCORE_BINS equal bins over [0, 1] (1.0 into the
    last; out-of-range scores clamp); frames an uncertainty rule fired for are counted."""
    from edge.telemetry.service import SCORE_BINS

    st = Stats(clock=FakeClock())
    for top, low in ((0.0, True), (0.049, True), (0.05, True), (0.51, False), (0.999, False), (1.0, False),
                     (1.7, False), (-0.2, True)):
        st.inference(0.001, top, low)
    st.inference(0.001)  # no score known: counted as processed only
    snap = st.snapshot()
    hist = snap["score_histogram"]
    assert len(hist) == SCORE_BINS == 20 and sum(hist) == 8
    assert hist[0] == 3 and hist[1] == 1 and hist[10] == 1 and hist[19] == 3
    assert snap["frames_low_confidence"] == 4 and snap["frames_processed"] == 9


def test_percentile_nearest_rank() -> None:
    vals = [float(v) for v in range(1, 101)]
    assert percentile(vals, 0.5) == 50.0
    assert percentile(vals, 0.95) == 95.0
    assert percentile([7.0], 0.95) == 7.0
    assert percentile([], 0.5) == 0.0


def test_stats_fps_latency_and_counters() -> None:
    clock = FakeClock()
    st = Stats(clock=clock, fps_window_s=10.0, latency_window=100)
    # 40 inferences over 4 s: 10 fps; latencies 1..40 ms
    for i in range(40):
        clock.t += 0.1
        st.frame_captured()
        st.inference((i + 1) / 1000.0)
    st.frame_dropped(3)
    st.frame_corrupt()
    st.frame_sampled()
    st.set_queue_depth(2)
    ref = kestrel_pb2.ModelRef(name="m", version=7, sha256="ab")
    st.set_model(ref)
    ref.version = 8  # the stats keep their own copy
    snap = st.snapshot()
    assert snap["fps"] == pytest.approx(10.0)
    assert snap["latency_p50_ms"] == pytest.approx(20.0)
    assert snap["latency_p95_ms"] == pytest.approx(38.0)
    assert snap["uptime_s"] == pytest.approx(4.0)
    assert (snap["frames_captured"], snap["frames_processed"], snap["frames_dropped"], snap["frames_corrupt"],
            snap["frames_sampled"], snap["queue_depth"]) == (40, 40, 3, 1, 1, 2)
    assert snap["model"].version == 7


def test_stats_windows_forget_old_data() -> None:
    clock = FakeClock()
    st = Stats(clock=clock, fps_window_s=10.0, latency_window=10)
    for _ in range(100):  # 100 slow inferences within the first 0.9 s
        clock.t += 0.009
        st.inference(0.5)
    for _ in range(10):  # then 10 fast ones at 1 fps
        clock.t += 1.0
        st.inference(0.001)
    snap = st.snapshot()
    assert snap["latency_p95_ms"] == pytest.approx(1.0)  # the latency window holds only the last 10
    assert snap["fps"] == pytest.approx(1.0)  # only the last 10 s count
    clock.t += 60
    assert st.snapshot()["fps"] == 0.0
    assert st.snapshot()["frames_processed"] == 110


def test_stats_is_thread_safe() -> None:
    st = Stats()
    def work() -> None:
        for _ in range(2000):
            st.inference(0.001)
            st.frame_captured()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = st.snapshot()
    assert snap["frames_processed"] == 8000 and snap["frames_captured"] == 8000


def parse_metrics(text: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = value
    return out


def make_cfg(host: str, port: int, interval: float) -> EdgeConfig:
    cfg = EdgeConfig()
    cfg.mqtt.host, cfg.mqtt.port = host, port
    cfg.mqtt.reconnect_min_s, cfg.mqtt.reconnect_max_s = 0.05, 0.3
    cfg.telemetry.interval_s = interval
    return cfg


def test_metrics_endpoint_serves_prometheus_text(broker, tmp_path: Path) -> None:  # noqa: ANN001
    clock = FakeClock()
    st = Stats(clock=clock)
    for ms in (10, 20, 30, 40):
        clock.t += 0.5
        st.inference(ms / 1000.0)
    st.frame_dropped(2)
    st.set_model(kestrel_pb2.ModelRef(name='cam "A"', version=3, sha256="ff"))
    cfg = make_cfg(broker.host, broker.port, 0)
    pub = publisher_for(cfg, "met1", tmp_path / "spool")
    pub.spool.append(lambda seq: b"x" * 100)
    svc = TelemetryService(cfg.telemetry, "met1", st, pub, metrics_port=EPHEMERAL_PORT)
    svc.start()
    try:
        assert svc.metrics_port > 0
        url = f"http://127.0.0.1:{svc.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = resp.read().decode()
        m = parse_metrics(text)
        assert "# TYPE kestrel_edge_frames_dropped_total counter" in text
        assert float(m["kestrel_edge_fps"]) == pytest.approx(2.0)
        assert float(m["kestrel_edge_latency_p50_ms"]) == pytest.approx(20.0)
        assert float(m["kestrel_edge_latency_p95_ms"]) == pytest.approx(40.0)
        # prometheus_client writes every value as a float ("4.0")
        assert float(m["kestrel_edge_frames_processed_total"]) == 4
        assert float(m["kestrel_edge_frames_dropped_total"]) == 2
        assert float(m["kestrel_edge_spool_frames"]) == 1
        assert float(m["kestrel_edge_spool_bytes"]) == pub.spool_stats()[0] > 100
        assert float(m["kestrel_edge_spool_evictions_total"]) == 0
        assert float(m["kestrel_edge_spool_corrupt_total"]) == 0
        assert float(m["kestrel_edge_frames_dead_lettered_total"]) == 0
        assert float(m["kestrel_edge_spool_write_failed_total"]) == 0
        assert float(m["kestrel_edge_mqtt_connected"]) == 0
        assert float(m['kestrel_edge_model_info{name="cam \\"A\\"",sha256="ff",version="3"}']) == 1
        assert not any(k.startswith("kestrel_edge_tegra") for k in m)  # no tegrastats here: no Jetson figures
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/other", timeout=5)
        assert err.value.code == 404
    finally:
        svc.stop()
        pub.stop(flush_timeout_s=0)
    assert svc.metrics_port == 0


def test_metrics_off_when_port_zero(tmp_path: Path) -> None:
    cfg = make_cfg("", 1883, 0)
    cfg.telemetry.metrics_port = 0
    svc = TelemetryService(cfg.telemetry, "off1", Stats(), None)
    svc.start()
    assert svc.metrics_port == 0
    svc.stop()


def test_telemetry_message_arrives_on_mqtt(broker, tmp_path: Path) -> None:  # noqa: ANN001
    dev = "tel1"
    col = Collector(broker.host, broker.port, [topics.telemetry(dev)], qos=0)
    cfg = make_cfg(broker.host, broker.port, 0.05)
    cfg.spool.max_frames = 1
    pub = publisher_for(cfg, dev, tmp_path / "spool")
    for _ in range(3):  # the frame budget keeps one frame: two evictions
        pub.spool.append(lambda seq: b"y" * 300)
    clock = FakeClock()
    st = Stats(clock=clock)
    for i in range(20):  # 20 inferences in 4 s: 5 fps; every fourth one low confidence (score 0.3)
        clock.t += 0.2
        st.inference(0.012, 0.3 if i % 4 == 0 else 0.9, i % 4 == 0)
    st.frame_sampled()
    st.set_queue_depth(3)
    st.set_model(kestrel_pb2.ModelRef(name="m", version=5, sha256="cd"))
    svc = TelemetryService(cfg.telemetry, dev, st, pub, metrics_port=0)
    before = svc.build_message()  # not connected yet: the spooled frame waits
    assert before.spool_frames == 1 and before.spool_bytes == pub.spool_stats()[0] > 300
    assert before.spool_evictions == 2
    try:
        pub.start()
        wait_for(lambda: pub.connected and pub.spool_stats()[1] == 0, 10, what="connected, the frame sent")
        svc.start()
        msgs: List[kestrel_pb2.Telemetry] = [kestrel_pb2.Telemetry.FromString(p)
                                             for p in col.wait_count(1, "/telemetry")]
        t = msgs[0]
        assert t.device_id == dev and t.time_ms > 0
        assert t.latency_p50_ms == pytest.approx(12.0) and t.latency_p95_ms == pytest.approx(12.0)
        assert t.queue_depth == 3 and t.frames_processed == 20 and t.frames_sampled == 1
        assert t.fps == pytest.approx(5.0)
        assert t.spool_frames == 0 and t.spool_bytes == 0 and t.spool_evictions == 2  # evictions are kept
        assert t.model.name == "m" and t.model.version == 5
        assert t.frames_low_confidence == 5 and t.dead_letters == 0
        assert list(t.score_histogram) == [0] * 6 + [5] + [0] * 11 + [15, 0]
        assert t.uptime_s > 0
        assert col.messages[0][0] == topics.telemetry(dev)
    finally:
        svc.stop()
        pub.stop(flush_timeout_s=0)
        col.close()
