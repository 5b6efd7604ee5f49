"""Several cameras on one daemon: [[sources]], the round-robin scheduler, batches through one invoke,
per-source figures (Stats, Prometheus labels, Telemetry.sources), on real models and real sources."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from demo.edge import write_video
from edge import config
from edge.config import PipelineConfig, SamplerConfig, SourceConfig
from edge.inference.runtime import load_model
from edge.pipeline.lanes import FairQueue
from edge.pipeline.loop import ModelHolder, Pipeline
from edge.pipeline.sampler import Sampler
from edge.sources import TestPatternSource, open_source
from edge.telemetry.service import Stats, TelemetryService
from proto.errors import ConfigError
from tests.helpers.pipeline import Recorder
from tests.helpers.wait import wait_for

LABELS = ["bright", "dark", "mid"]


def no_limits() -> Sampler:
    return Sampler(SamplerConfig(max_per_minute=0, max_per_hour=0, max_per_day=0, dedup_distance=-1))




# --- the scheduler ------------------------------------------------------------------------------------
def test_fair_queue_takes_round_robin_and_gives_idle_turns_away() -> None:
    fq = FairQueue()
    a, b, c = (fq.add(n, None, 10, drop_oldest=False) for n in "abc")
    for i in range(5):
        fq.put(a, f"a{i}")
    for i in range(2):
        fq.put(b, f"b{i}")
    fq.put(c, "c0")
    order = [item for _ in range(8) for _lane, item in fq.take(1)]
    assert order == ["a0", "b0", "c0", "a1", "b1", "a2", "a3", "a4"]  # a only repeats once b and c are empty
    for i in range(3):
        fq.put(a, f"a{5 + i}")
    fq.put(c, "c1")
    # a batch: one frame per source first, then the turns of the sources that have nothing
    assert [item for _lane, item in fq.take(4)] == ["c1", "a5", "a6", "a7"]
    assert fq.depth() == 0


def test_fair_queue_policies_are_per_source_and_it_ends_when_every_source_has() -> None:
    fq = FairQueue()
    live = fq.add("live", None, 2, drop_oldest=True)
    slow_file = fq.add("file", None, 1, drop_oldest=False)
    assert [fq.put(live, i) for i in range(5)] == [0, 0, 1, 1, 1]  # the oldest of *this* source dropped
    assert fq.put(slow_file, "f0") == 0
    blocked = threading.Event()
    done = threading.Event()

    def put_second() -> None:
        blocked.set()
        fq.put(slow_file, "f1")  # the file's queue is full: waits for room, drops nothing
        done.set()

    t = threading.Thread(target=put_second, daemon=True)
    t.start()
    blocked.wait(5)
    assert not done.wait(0.2)  # still waiting (a real wait on the condition, checked once)
    taken = [(lane.name, item) for lane, item in fq.take(3)]
    assert taken == [("live", 3), ("file", "f0"), ("live", 4)]
    assert done.wait(5)  # room made: the blocked capture went on
    fq.end(live)
    fq.end(slow_file)
    assert [item for _lane, item in fq.take(4)] == ["f1"]  # drained after the end
    assert fq.take(4) == []  # every source ended and nothing is queued: the inference loop stops
    t.join(5)


def test_a_flooding_source_cannot_starve_a_slow_camera(models_dir: Path) -> None:
    """An unpaced source (a file read as fast as it decodes) keeps inference busy all the time; a camera at
    10 fps with a queue of one frame still gets every frame through: its turn comes every other frame."""
    model = load_model(models_dir / "slow_int8.tflite", labels=LABELS, threads=1)
    fast = open_source(SourceConfig(kind="testpattern", name="flood", width=64, height=64, fps=0,
                                    pattern_brightness=[0.9]))
    slow = open_source(SourceConfig(kind="testpattern", name="door", width=64, height=64, fps=10,
                                    pattern_brightness=[0.1], queue_size=1, drop_policy="drop_oldest"))
    rec = Recorder()
    p = Pipeline([fast, slow], ModelHolder(model), no_limits(), rec.sink, PipelineConfig(queue_size=4),
                 observers=[rec.observe]).start()
    try:
        wait_for(lambda: len(rec.by_source().get("door", [])) >= 15, 60, what="15 frames of the slow camera")
    finally:
        assert p.stop(30)
    model.close()
    flood, door = p.lanes
    assert (flood.name, door.name) == ("flood", "door") and not flood.drop_oldest and door.drop_oldest
    assert door.dropped == 0 and door.processed == door.captured >= 15  # none of the slow camera's frames lost
    assert flood.processed > door.processed  # the flood had every other turn (and the idle ones)
    got = rec.by_source()
    assert all(r.scores[0] > 0.9 for r in got["flood"]) and all(r.scores[1] > 0.9 for r in got["door"])
    seqs = [r.seq for r in rec.results]
    assert len(set(seqs)) == len(seqs) == p.processed  # frame numbers are unique over the sources


# --- frames, results and sampled frames carry their source --------------------------------------------------
def test_four_sources_one_interpreter_every_frame_attributed(models_dir: Path, tmp_path: Path) -> None:
    video = write_video(tmp_path / "dark.avi", [0.1] * 12, width=80, height=60)
    cams = [SourceConfig(kind="file", name="dark-file", uri=str(video)),
            SourceConfig(kind="testpattern", name="bright", width=96, height=72, fps=0, max_frames=12,
                         pattern_brightness=[0.92]),
            SourceConfig(kind="testpattern", name="mid-a", width=64, height=48, fps=0, max_frames=12,
                         pattern_brightness=[0.5]),
            SourceConfig(kind="testpattern", name="mid-b", width=48, height=40, fps=0, max_frames=12,
                         pattern_brightness=[0.45])]
    model = load_model(models_dir / "brightness_int8.tflite", labels=LABELS, threads=1)
    rec = Recorder()
    stats = Stats()
    smp = Sampler(SamplerConfig(confidence_threshold=0.6, max_per_minute=0, max_per_hour=0, max_per_day=0,
                                dedup_distance=-1))
    p = Pipeline([open_source(c) for c in cams], ModelHolder(model), smp, rec.sink, PipelineConfig(), stats,
                 observers=[rec.observe])
    p.run()
    model.close()
    assert p.processed == p.captured == 48 and p.errors == 0 and p.capture_error is None
    got = rec.by_source()
    assert sorted(got) == sorted(c.name for c in cams) and all(len(v) == 12 for v in got.values())
    assert all(LABELS[int(np.argmax(r.scores))] == "dark" for r in got["dark-file"])
    assert all(LABELS[int(np.argmax(r.scores))] == "bright" for r in got["bright"])
    # only the mid-brightness sources are unsure; each sampled frame names its camera and is its camera's image
    sizes = {"mid-a": (48, 64, 3), "mid-b": (40, 48, 3)}
    assert sorted({s.source for s in rec.sampled}) == ["mid-a", "mid-b"] and len(rec.sampled) == 24
    assert all(s.bgr.shape == sizes[s.source] for s in rec.sampled)
    snap = stats.snapshot()
    per = {s["name"]: s for s in snap["sources"]}
    assert [s["name"] for s in snap["sources"]] == [c.name for c in cams]  # registered up front, in order
    assert all(per[n]["frames_captured"] == per[n]["frames_processed"] == 12 for n in per)
    assert (per["mid-a"]["frames_sampled"], per["bright"]["frames_sampled"]) == (12, 0)
    assert sum(s["frames_processed"] for s in snap["sources"]) == snap["frames_processed"] == 48
    assert not any(s["up"] for s in snap["sources"])  # every source ended
    assert p.per_source()["dark-file"] == {"captured": 12, "processed": 12, "dropped": 0, "corrupt": 0,
                                           "errors": 0, "reconnects": 0, "failed": 0}


def test_batches_of_several_sources_go_through_one_invoke(models_dir: Path) -> None:
    model = load_model(models_dir / "brightness_int8.tflite", labels=LABELS, threads=1)
    assert model.batchable  # the converter's dynamic batch dimension (shape_signature[0] == -1)
    frames = [np.full((48, 64, 3), int(v * 255), np.uint8) for v in (0.1, 0.5, 0.92)]
    single = [model.infer(f) for f in frames]
    batch, thumbs = model.infer_batch(frames)
    assert all(np.array_equal(a, b) for a, b in zip(single, batch))  # the same answers, frame by frame
    assert [t.shape for t in thumbs] == [(64, 64, 3)] * 3 and abs(float(thumbs[2].mean()) - 0.92 * 255) < 2
    assert np.array_equal(model.infer(frames[1]), single[1])  # back to one frame after a batch
    cams = [SourceConfig(kind="testpattern", name=f"cam{i}", width=64, height=48, fps=0, max_frames=40,
                         pattern_brightness=[level]) for i, level in enumerate((0.1, 0.92, 0.1, 0.92))]
    rec = Recorder()
    p = Pipeline([open_source(c) for c in cams], ModelHolder(model), no_limits(), rec.sink,
                 PipelineConfig(max_batch=4), observers=[rec.observe])
    p.run()
    model.close()
    assert p.processed == 160 and p.errors == 0 and p.batches > 0
    for r in rec.results:  # each frame kept its own answer and its own source inside a batch
        expected = "dark" if r.source in ("cam0", "cam2") else "bright"
        assert LABELS[int(np.argmax(r.scores))] == expected and r.latency_s > 0


def test_a_source_that_fails_stops_alone(models_dir: Path, tmp_path: Path) -> None:
    class Broken(TestPatternSource):
        def _read(self) -> Any:
            if self.frames >= 3:
                raise OSError("the camera's driver went away")
            return super()._read()

    model = load_model(models_dir / "brightness_int8.tflite", labels=LABELS, threads=1)
    broken = Broken(SourceConfig(kind="testpattern", name="broken", width=32, height=24, fps=0)).open()
    good = open_source(SourceConfig(kind="testpattern", name="good", width=32, height=24, fps=0, max_frames=30))
    p = Pipeline([broken, good], ModelHolder(model), no_limits(), lambda s: None)
    p.run()
    model.close()
    bad, ok = p.lanes
    assert isinstance(bad.capture_error, OSError) and bad.processed == 3
    assert ok.capture_error is None and ok.processed == 30
    assert p.capture_error is bad.capture_error and p.per_source()["broken"]["failed"] == 1


# --- per-source figures: Prometheus labels and the Telemetry message ---------------------------------------------
def test_per_source_metrics_and_telemetry(tmp_path: Path) -> None:
    stats = Stats()
    reconnects = {"n": 0}
    stats.watch_source("door", lambda: (reconnects["n"] == 0, reconnects["n"]))
    stats.watch_source("yard")
    for _ in range(3):
        stats.frame_captured("door")
        stats.inference(0.002, source="door")
    stats.frame_sampled("door")
    stats.frame_captured("yard")
    stats.frame_dropped(2, "yard")
    stats.frame_failed("yard")
    stats.set_queue_depth(2, "door")
    stats.set_queue_depth(1, "yard")
    reconnects["n"] = 4
    svc = TelemetryService(config.TelemetryConfig(interval_s=0, metrics_port=0), "cam-m", stats, None)
    text = svc.render_metrics()
    assert 'kestrel_edge_source_frames_processed_total{source="door"} 3.0' in text
    assert 'kestrel_edge_source_frames_dropped_total{source="yard"} 2.0' in text
    assert 'kestrel_edge_source_errors_total{source="yard"} 1.0' in text
    assert 'kestrel_edge_source_up{source="door"} 0.0' in text  # its probe says it is reconnecting
    assert 'kestrel_edge_source_reconnects_total{source="door"} 4.0' in text
    assert 'kestrel_edge_source_queue_depth{source="door"} 2.0' in text
    assert "kestrel_edge_queue_depth 3.0" in text  # the device-wide figures are the sums
    assert "kestrel_edge_frames_captured_total 4.0" in text
    msg = svc.build_message()
    assert [s.name for s in msg.sources] == ["door", "yard"]
    door, yard = msg.sources
    assert (door.frames_captured, door.frames_processed, door.frames_sampled, door.reconnects, door.up) == \
        (3, 3, 1, 4, False)
    assert (yard.frames_captured, yard.frames_dropped, yard.errors, yard.queue_depth, yard.up) == (1, 2, 1, 1, True)
    assert door.fps > 0 and yard.fps == 0


# --- the config -----------------------------------------------------------------------------------------------
def test_sources_config(tmp_path: Path) -> None:
    p = tmp_path / "edge.toml"
    p.write_text('[[sources]]\nname = "door"\nkind = "rtsp"\nuri = "rtsp://cam/1"\nqueue_size = 2\n'
                 'drop_policy = "drop_oldest"\n\n[[sources]]\nname = "yard"\nkind = "testpattern"\n'
                 '\n[pipeline]\nmax_batch = 4\n')
    cfg = config.load(p)
    assert cfg.source is None and [c.name for c in cfg.camera_sources] == ["door", "yard"]
    assert cfg.camera_sources[0].queue_size == 2 and cfg.pipeline.max_batch == 4
    assert config.load(None).camera_sources[0].name == "cam0"  # neither: the default test pattern


@pytest.mark.parametrize("body, msg", [
    ('[source]\nkind = "testpattern"\n\n[[sources]]\nname = "a"\n', "give either [source]"),
    ('[[sources]]\nname = "a"\n[[sources]]\nname = "a"\n', "two [[sources]] are named 'a'"),
    ('[[sources]]\nname = "front door"\n', "sources[0]: name 'front door' is not a source name"),
    ('[[sources]]\nname = "a"\n[[sources]]\nname = "b"\nkind = "file"\n', "sources[1]: kind='file' needs uri"),
    ('[sources]\nname = "a"\n', "expected an array of tables ([[sources]], one per entry)"),
    ('[[sources]]\nname = "a"\ncolour = "red"\n', "unknown key 'sources[0].colour'"),
    ('[[sources]]\nname = "a"\ndrop_policy = "newest"\n', "drop_policy must be empty"),
    ('[[sources]]\nname = "a"\nqueue_size = -1\n', "queue_size must be >= 0"),
    ('[pipeline]\nmax_batch = 0\n', "max_batch must be 1..64"),
])
def test_bad_sources_have_clear_errors(tmp_path: Path, body: str, msg: str) -> None:
    p = tmp_path / "edge.toml"
    p.write_text(body)
    with pytest.raises(ConfigError, match=re.escape(msg)):
        config.load(p)


def test_check_plausible_names_the_source(tmp_path: Path) -> None:
    from edge.configcheck import check_plausible

    cfg = config.from_dict({"device": {"data_dir": str(tmp_path / "d")},
                            "sources": [{"name": "ok", "kind": "testpattern"},
                                        {"name": "gone", "kind": "file", "uri": str(tmp_path / "nope.avi")},
                                        {"name": "cam", "kind": "rtsp", "uri": "http://x"}]})
    problems = check_plausible(cfg)
    assert problems == [f"sources[1] (gone).uri: video file {tmp_path / 'nope.avi'} does not exist",
                        "sources[2] (cam).uri: 'http://x' is not an rtsp:// URL"]


def test_several_sources_share_the_queue_budget() -> None:
    from edge.pipeline.loop import source_queue_size

    assert source_queue_size(4, 1) == 4  # one source: all of [pipeline] queue_size, as before
    assert [source_queue_size(4, n) for n in (2, 4, 8)] == [2, 2, 2]  # at least 2 each
    assert source_queue_size(12, 4) == 3 and source_queue_size(10, 4) == 3
    cams = [open_source(SourceConfig(kind="testpattern", name=f"c{i}", width=8, height=8, fps=0, max_frames=1,
                                     queue_size=5 if i == 0 else 0)) for i in range(3)]
    p = Pipeline(cams, ModelHolder(None), no_limits(), lambda s: None, PipelineConfig(queue_size=12))
    assert [lane.maxsize for lane in p.lanes] == [5, 4, 4]  # a source's own queue_size wins


def test_files_beside_other_sources_capture_at_a_lower_priority(models_dir: Path) -> None:
    """A file is read only as fast as the model takes its frames: beside other sources its capture thread
    yields the cores to inference (Linux); a live camera's keeps the normal priority."""
    import os
    import sys

    from edge.pipeline.loop import FILE_CAPTURE_NICENESS

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread priorities are set on Linux only")
    seen = {}

    class Recording(TestPatternSource):
        def _read(self) -> Any:
            seen.setdefault(self.name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
            return super()._read()

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    model = load_model(models_dir / "brightness_int8.tflite", labels=LABELS, threads=1)
    file_like = Recording(SourceConfig(kind="testpattern", name="file", width=32, height=24, fps=0, max_frames=5))
    live = Recording(SourceConfig(kind="testpattern", name="live", width=32, height=24, fps=200, max_frames=5))
    assert not file_like.live and live.live
    Pipeline([file_like, live], ModelHolder(model), no_limits(), lambda s: None).run()
    alone = Recording(SourceConfig(kind="testpattern", name="alone", width=32, height=24, fps=0, max_frames=5))
    Pipeline(alone, ModelHolder(model), no_limits(), lambda s: None).run()
    model.close()
    assert seen == {"file": min(19, mine + FILE_CAPTURE_NICENESS), "live": mine, "alone": mine}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # this thread is unchanged
