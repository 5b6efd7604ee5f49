"""Sampler decisions, rate limits with an injected clock, near-duplicate suppression."""

from __future__ import annotations

import dataclasses

import numpy as np

from edge.config import SamplerConfig
from edge.inference.perceptual import dhash, hamming, phash
from edge.pipeline.sampler import Sampler, normalized_entropy, uncertainty_reasons
from proto import kestrel_pb2 as pb


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def cfg(**kw) -> SamplerConfig:  # noqa: ANN003
    base = SamplerConfig(max_per_minute=0, max_per_hour=0, max_per_day=0, dedup_distance=-1)
    return dataclasses.replace(base, **kw)


def scene(seed: int, h: int = 120, w: int = 160) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
    return np.kron(small, np.ones((10, 10, 1), np.uint8))[:h, :w]


def test_confidence_threshold():
    c = cfg(strategies=["confidence"], confidence_threshold=0.6)
    assert uncertainty_reasons(np.array([0.59, 0.3, 0.11]), c) == [pb.LOW_CONFIDENCE]
    assert uncertainty_reasons(np.array([0.61, 0.3, 0.09]), c) == []


def test_margin_threshold():
    c = cfg(strategies=["margin"], margin_threshold=0.1)
    assert uncertainty_reasons(np.array([0.45, 0.40, 0.15]), c) == [pb.LOW_MARGIN]
    assert uncertainty_reasons(np.array([0.55, 0.40, 0.05]), c) == []


def test_entropy_threshold():
    c = cfg(strategies=["entropy"], entropy_threshold=0.9)
    assert normalized_entropy(np.array([1 / 3] * 3)) > 0.999
    assert normalized_entropy(np.array([1.0, 0.0, 0.0])) == 0.0
    assert uncertainty_reasons(np.array([0.34, 0.33, 0.33]), c) == [pb.HIGH_ENTROPY]
    assert uncertainty_reasons(np.array([0.9, 0.05, 0.05]), c) == []


def test_any_strategy_fires_and_all_reasons_listed():
    c = cfg(strategies=["confidence", "margin", "entropy"])
    d = Sampler(c).decide(np.array([0.34, 0.33, 0.33]))
    assert d.send and d.reasons == [pb.LOW_CONFIDENCE, pb.LOW_MARGIN, pb.HIGH_ENTROPY]
    confident = Sampler(c).decide(np.array([0.98, 0.01, 0.01]))
    assert not confident.low_confidence and not confident.send and confident.reasons == []


def test_rate_limits_hold_with_injected_clock():
    clock = Clock()
    s = Sampler(cfg(max_per_minute=3, max_per_hour=5), clock=clock)
    low = np.array([0.4, 0.3, 0.3])
    sent = [s.decide(low).send for _ in range(10)]
    assert sent.count(True) == 3 and sent[:3] == [True] * 3
    assert s.counters()["rate_limited"] == 7
    clock.t += 61                       # a new minute: 2 more allowed by the hour limit
    sent = [s.decide(low).send for _ in range(10)]
    assert sent.count(True) == 2
    clock.t += 61
    assert not s.decide(low).send       # hour limit still full
    clock.t += 3600
    assert s.decide(low).send           # the hour is clear again; the minute holds 1 of 3
    d = s.decide(low)
    assert d.low_confidence and d.send and d.skipped == ""
    assert [s.decide(low).skipped for _ in range(2)] == ["", "rate_limited"]  # the minute's 3rd, then full


def test_day_limit():
    clock = Clock()
    s = Sampler(cfg(max_per_day=2), clock=clock)
    low = np.array([0.4, 0.3, 0.3])
    assert [s.decide(low).send for _ in range(3)] == [True, True, False]
    clock.t += 86401
    assert s.decide(low).send


def test_duplicates_suppressed_for_static_scene_changed_scene_passes():
    clock = Clock()
    s = Sampler(cfg(dedup_distance=6, dedup_window_s=300), clock=clock)
    low = np.array([0.4, 0.3, 0.3])
    a = scene(1)
    noise = np.random.default_rng(9).integers(-3, 4, a.shape)
    noisy = np.clip(a.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    assert s.decide(low, a).send
    d = s.decide(low, noisy)
    assert not d.send and d.skipped == "duplicate"
    assert s.decide(low, scene(2)).send          # a changed scene goes through
    assert s.counters()["duplicate"] == 1 and s.counters()["sampled"] == 2
    clock.t += 301                               # the window expired
    assert s.decide(low, a).send


def test_a_new_model_may_send_a_scene_the_previous_model_already_sent():
    clock = Clock()
    s = Sampler(cfg(dedup_distance=6, dedup_window_s=300, max_per_minute=3), clock=clock)
    low = np.array([0.4, 0.3, 0.3])
    assert s.decide(low, scene(1)).send
    assert s.decide(low, scene(1)).skipped == "duplicate"
    s.model_changed()                            # hot swap: the new model's doubts are news
    assert s.decide(low, scene(1)).send
    assert s.decide(low, scene(1)).skipped == "duplicate"
    assert s.decide(low, scene(2)).send          # the rate limit carried on across the swap: 3 sent
    assert s.decide(low, scene(3)).skipped == "rate_limited"


def test_phash_and_dhash_distances():
    a, b = scene(1), scene(2)
    for h in (dhash, phash):
        assert 0 <= h(a) < 2 ** 64
        assert hamming(h(a), h(a)) == 0
        assert hamming(h(a), h(b)) > 10


def test_threshold_unset_follows_the_model_default_and_explicit_wins():
    scores = np.array([0.5, 0.3, 0.2])
    s = Sampler(cfg(strategies=["confidence"], confidence_threshold=None))
    assert s.confidence_threshold == 0.6 and s.decide(scores).send          # built-in default
    assert s.follow_model_default(0.4) == 0.4 and not s.decide(scores).send  # bundle default
    assert s.follow_model_default(None) == 0.6 and s.decide(scores).send    # bare .tflite again
    s.set_confidence_threshold(0.45)
    assert s.follow_model_default(0.9) == 0.45 and not s.decide(scores).send  # explicit wins
    fixed = Sampler(cfg(strategies=["confidence"], confidence_threshold=0.55))
    assert fixed.threshold_from_config and fixed.follow_model_default(0.9) == 0.55


def test_duplicates_judged_on_the_models_thumbnail(models_dir):
    """The pipeline hashes the model's resized input (cheap on camera-size frames), with the same verdicts."""
    from edge.inference.runtime import load_model

    model = load_model(models_dir / "brightness_int8.tflite")
    hashed = []

    def hasher(img: np.ndarray) -> int:
        hashed.append(img.shape[:2])
        return dhash(img)

    s = Sampler(cfg(dedup_distance=6, dedup_window_s=300), clock=Clock(), hasher=hasher)
    low = np.array([0.4, 0.3, 0.3])
    a = np.kron(scene(1), np.ones((6, 6, 1), np.uint8))          # 720x960 camera-size frame
    noisy = np.clip(a.astype(np.int16) + np.random.default_rng(9).integers(-3, 4, a.shape), 0, 255)
    noisy = noisy.astype(np.uint8)
    b = np.kron(scene(2), np.ones((6, 6, 1), np.uint8))
    verdicts = []
    for frame in (a, noisy, b):
        model.infer(frame)
        thumb = model.last_resized
        assert thumb is not None and thumb.shape[:2] == (64, 64)
        verdicts.append(s.decide(low, frame, thumbnail=thumb))
    assert [d.send for d in verdicts] == [True, False, True]
    assert verdicts[1].skipped == "duplicate"
    assert hashed == [(64, 64)] * 3                            # the thumbnail was hashed, never the frame


def test_rate_limit_windows_persist_across_restarts(tmp_path):  # noqa: ANN001
    """Two "processes" (samplers with their own monotonic clocks) share the state file; wall time goes on."""
    state = tmp_path / "sent.log"
    wall = Clock()
    wall.t = 1_700_000_000.0
    low = np.array([0.4, 0.3, 0.3])
    first = Sampler(cfg(max_per_minute=3, max_per_day=5), clock=Clock(), state_path=state, wall_clock=wall)
    assert [first.decide(low).send for _ in range(4)] == [True, True, True, False]
    assert len(state.read_text().splitlines()) == 3
    wall.t += 30                                     # a restart 30 s later: the minute is still full
    mono = Clock()
    mono.t = 5.0                                     # a new process: its monotonic clock starts elsewhere
    second = Sampler(cfg(max_per_minute=3, max_per_day=5), clock=mono, state_path=state, wall_clock=wall)
    assert not second.decide(low).send
    mono.t += 31
    wall.t += 31                                     # the minute has passed; the day allows 2 more
    assert [second.decide(low).send for _ in range(3)] == [True, True, False]
    with open(state, "a") as fh:
        fh.write("17000")                            # a torn last line (power cut mid-write)
    wall.t += 60
    third = Sampler(cfg(max_per_minute=3, max_per_day=5), clock=Clock(), state_path=state, wall_clock=wall)
    assert not third.decide(low).send and third.counters()["rate_limited"] == 1   # the day holds 5
    wall.t += 86400
    fourth = Sampler(cfg(max_per_minute=3, max_per_day=5), clock=Clock(), state_path=state, wall_clock=wall)
    assert [fourth.decide(low).send for _ in range(2)] == [True, True]   # a day later everything has expired
    times = [float(line) for line in state.read_text().splitlines()]
    assert all(1_700_000_000 <= t <= wall.t for t in times), times   # nothing appended onto the torn line
    fifth = Sampler(cfg(max_per_minute=3, max_per_day=5), clock=Clock(), state_path=state, wall_clock=wall)
    assert [fifth.decide(low).send for _ in range(2)] == [True, False]   # both of fourth's count: 3 this minute


def test_saved_times_in_the_future_do_not_fill_the_windows(tmp_path, caplog):  # noqa: ANN001
    """A device whose wall clock is unset after a power cut (1970): the saved times are all "in the
    future". They keep their spacing with the newest counting as now, so the ones older than a day
    (relative to it) no longer count, and the file is rewritten in the current clock's terms."""
    import logging

    state = tmp_path / "sent.log"
    t = 1_700_000_000.0
    state.write_text("".join(f"{t - 2 * 86400 + i:.3f}\n" for i in range(5)) + f"{t:.3f}\n")
    wall = Clock()
    wall.t = 100.0                                   # 1970
    low = np.array([0.4, 0.3, 0.3])
    with caplog.at_level(logging.WARNING, logger="edge.pipeline.sampler"):
        s = Sampler(cfg(max_per_minute=3, max_per_day=5), clock=Clock(), state_path=state, wall_clock=wall)
    assert [s.decide(low).send for _ in range(3)] == [True, True, False]   # 1 + 2 this minute
    assert any("in the future" in r.getMessage() for r in caplog.records)
    assert s.counters()["rate_limited"] == 1
    times = [float(line) for line in state.read_text().splitlines()]
    assert len(times) == 3 and all(0 < x <= wall.t for x in times), times


def test_rate_state_file_is_compacted(tmp_path):  # noqa: ANN001
    state = tmp_path / "sent.log"
    clock, wall = Clock(), Clock()
    s = Sampler(cfg(max_per_minute=2), clock=clock, state_path=state, wall_clock=wall)
    low = np.array([0.4, 0.3, 0.3])
    for _ in range(20):
        clock.t += 61
        wall.t += 61
        assert s.decide(low).send
    assert len(state.read_text().splitlines()) <= 4  # never more than twice what the limits need


def test_no_limits_no_state_file(tmp_path):  # noqa: ANN001
    state = tmp_path / "sent.log"
    s = Sampler(cfg(), state_path=state)
    assert all(s.decide(np.array([0.4, 0.3, 0.3])).send for _ in range(5))
    assert not state.exists()


def test_the_rules_the_trainer_sweeps_are_the_samplers_own():
    """edge.inference.uncertainty is what the sampler decides with; its comparisons give the same answer on an
    array of values (how the trainer sweeps them) as on each value alone (how the device calls them)."""
    from edge.inference import FIRES, rule_values

    frames = [np.array(s) for s in ([0.59, 0.3, 0.11], [0.61, 0.3, 0.09], [0.45, 0.40, 0.15], [0.34, 0.33, 0.33],
                                    [0.9, 0.05, 0.05], [1.0, 0.0, 0.0])]
    values = np.array([rule_values(s) for s in frames])
    c = cfg(strategies=["confidence", "margin", "entropy"], confidence_threshold=0.6, margin_threshold=0.1,
            entropy_threshold=0.9)
    for s, (top, margin, ent) in zip(frames, values):
        want = uncertainty_reasons(s, c)
        got = [r for r, fires in ((pb.LOW_CONFIDENCE, FIRES["confidence"](top, 0.6)),
                                  (pb.LOW_MARGIN, FIRES["margin"](margin, 0.1)),
                                  (pb.HIGH_ENTROPY, FIRES["entropy"](ent, 0.9))) if fires]
        assert got == want, s
    for i, (rule, t) in enumerate((("confidence", 0.6), ("margin", 0.1), ("entropy", 0.9))):
        assert list(FIRES[rule](values[:, i], t)) == [bool(FIRES[rule](v, t)) for v in values[:, i]]
    assert list(FIRES["confidence"](values[:, 0], 0.6)) == [True, False, True, True, False, False]
