"""The capture -> inference -> sampler pipeline on real models and real sources."""

from __future__ import annotations

import pytest

from demo.edge import write_video
from edge.config import PipelineConfig, SamplerConfig, SourceConfig
from edge.inference.runtime import load_model
from edge.pipeline.loop import InferenceResult, ModelHolder, Pipeline
from edge.pipeline.sampler import Sampler
from edge.sources import open_source
from proto import kestrel_pb2 as pb
from tests.helpers.pipeline import Recorder
from tests.helpers.wait import wait_for

LABELS = ["bright", "dark", "mid"]


def sampler() -> Sampler:
    return Sampler(SamplerConfig(max_per_minute=0, max_per_hour=0, max_per_day=0, dedup_distance=-1))




def test_low_confidence_frames_reach_the_sink(models_dir, tmp_path):  # noqa: ANN001
    levels = [0.9, 0.5, 0.95, 0.5, 0.1, 0.45] * 3
    video = write_video(tmp_path / "v.avi", levels, width=160, height=120)
    model = load_model(models_dir / "brightness_int8.tflite", labels=LABELS, threads=1)
    rec = Recorder()
    src = open_source(SourceConfig(kind="file", uri=str(video)))
    p = Pipeline(src, ModelHolder(model), sampler(), rec.sink, PipelineConfig(queue_size=2),
                 observers=[rec.observe])
    assert not p.drop_oldest
    p.run()
    assert [r.seq for r in rec.results] == list(range(1, len(levels) + 1))
    expected = [i + 1 for i, lv in enumerate(levels) if 0.3 < lv < 0.7]
    assert [s.seq for s in rec.sampled] == expected
    assert all(s.reasons == [pb.LOW_CONFIDENCE] and s.labels == LABELS for s in rec.sampled)
    assert all(s.bgr.shape == (120, 160, 3) and s.model_ref.sha256 == model.ref.sha256 for s in rec.sampled)
    bright = [r for r, lv in zip(rec.results, levels) if lv >= 0.9]
    assert bright and all(not r.low_confidence and r.error is None and r.scores[0] > 0.95 for r in bright)
    assert p.dropped == 0 and p.errors == 0


def test_swap_takes_effect_on_next_frame_without_dropping(models_dir):  # noqa: ANN001
    first = load_model(models_dir / "brightness_int8.tflite", labels=LABELS, threads=1, name="first")
    second = load_model(models_dir / "uniform_int8.tflite", labels=LABELS, threads=1, name="second")
    holder = ModelHolder(first)
    rec = Recorder()
    n = 30

    def swap_at_10(r: InferenceResult) -> None:
        rec.observe(r)
        if r.seq == 10:
            holder.swap(second).close()   # like the updater: swap, then close the old model

    src = open_source(SourceConfig(kind="testpattern", width=96, height=72, fps=0, max_frames=n,
                                   pattern_brightness=[0.9]))
    p = Pipeline(src, holder, sampler(), rec.sink, PipelineConfig(queue_size=4), observers=[swap_at_10])
    p.run()
    assert [r.seq for r in rec.results] == list(range(1, n + 1))
    assert all(r.error is None for r in rec.results)
    names = [r.model_ref.name for r in rec.results]
    assert names[:10] == ["first"] * 10 and names[10:] == ["second"] * (n - 10)
    # the bright scene is confident on the first model, always uncertain on the uniform one
    assert [s.seq for s in rec.sampled] == list(range(11, n + 1))


def test_stop_drains_queued_frames(models_dir):  # noqa: ANN001
    model = load_model(models_dir / "slow_int8.tflite", labels=LABELS, threads=1)
    rec = Recorder()
    src = open_source(SourceConfig(kind="testpattern", width=64, height=64, fps=0))  # endless
    p = Pipeline(src, ModelHolder(model), sampler(), rec.sink, PipelineConfig(queue_size=4),
                 observers=[rec.observe]).start()
    wait_for(lambda: len(rec.results) >= 3, 30, what="3 inferences")
    assert p.stop(30)
    assert p.captured == p.processed == len(rec.results) and p.dropped == 0
    assert src.closed


def test_live_source_drops_oldest_when_inference_lags(models_dir):  # noqa: ANN001
    model = load_model(models_dir / "slow_int8.tflite", labels=LABELS, threads=1)
    rec = Recorder()
    src = open_source(SourceConfig(kind="testpattern", width=64, height=64, fps=2000))
    p = Pipeline(src, ModelHolder(model), sampler(), rec.sink, PipelineConfig(queue_size=1),
                 observers=[rec.observe]).start()
    assert p.drop_oldest
    wait_for(lambda: p.dropped >= 3 and len(rec.results) >= 2, 30, what="drops while inference lags")
    assert p.stop(30)
    assert p.processed + p.dropped == p.captured
    seqs = [r.seq for r in rec.results]
    assert seqs == sorted(seqs) and len(seqs) < p.captured


@pytest.mark.parametrize("policy", ["block", "drop_oldest"])
def test_drop_policy_override(models_dir, policy):  # noqa: ANN001
    model = load_model(models_dir / "brightness_int8.tflite", labels=LABELS, threads=1)
    src = open_source(SourceConfig(kind="testpattern", width=64, height=64, fps=0, max_frames=3))
    p = Pipeline(src, ModelHolder(model), sampler(), lambda s: None, PipelineConfig(drop_policy=policy))
    assert p.drop_oldest == (policy == "drop_oldest")
    p.run()
    assert p.captured == 3


def test_a_frame_that_fails_unexpectedly_is_counted_and_the_run_goes_on(models_dir, caplog):  # noqa: ANN001
    """A real OpenCV error on the inference thread (here from the sampler's hash on every low-confidence
    frame) costs that frame only: counted, logged once, the next frames are processed."""
    import logging

    import cv2
    import numpy as np

    from edge.inference.perceptual import dhash

    def broken_hash(img: np.ndarray) -> int:
        return dhash(img[:0])  # cv2.resize of an empty image: cv2.error

    with pytest.raises(cv2.error):
        broken_hash(np.zeros((8, 8, 3), np.uint8))
    model = load_model(models_dir / "brightness_int8.tflite", labels=LABELS, threads=1)
    rec = Recorder()
    levels = [0.9, 0.5] * 5  # 5 confident frames, 5 low-confidence ones (those fail)
    src = open_source(SourceConfig(kind="testpattern", width=64, height=48, fps=0, max_frames=len(levels),
                                   pattern_brightness=levels))
    smp = Sampler(SamplerConfig(max_per_minute=0, max_per_hour=0, max_per_day=0, dedup_distance=6),
                  hasher=broken_hash)
    p = Pipeline(src, ModelHolder(model), smp, rec.sink, PipelineConfig(), observers=[rec.observe])
    with caplog.at_level(logging.DEBUG, logger="edge.pipeline.loop"):
        p.run()
    assert p.processed == len(levels) and p.errors == 5 and p.error_kinds == {"error": 5}
    # every frame reaches the observers (the updater's trial watch): the failed ones as error results
    assert [r.seq for r in rec.results] == list(range(1, len(levels) + 1)) and rec.sampled == []
    failed = [r for r in rec.results if r.error is not None]
    assert [r.seq for r in failed] == [2, 4, 6, 8, 10]
    assert all(r.error.startswith("error:") and r.model_ref == model.ref and not r.sampled for r in failed)
    assert all(r.top is not None and r.top > 0.9 for r in rec.results if r.error is None)
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(logged) == 1 and "frame 2 could not be processed" in logged[0].getMessage()


def test_non_finite_scores_are_error_results_never_confident_frames(models_dir):  # noqa: ANN001
    """NaN scores look confident to a threshold test (NaN < t is False): the pipeline makes them error
    results, counted, never sampled, and the trial watch counts them as errors."""
    import numpy as np

    from edge.updater.health import HealthWatch, TrialCriteria

    model = load_model(models_dir / "nan_float.tflite", labels=LABELS, threads=1)  # NaN weights: NaN scores
    assert np.isnan(model.infer(np.zeros((48, 64, 3), np.uint8))).all()
    watch = HealthWatch(TrialCriteria(frames=100, seconds=0, max_errors=3))
    watch.begin_trial(model.ref, None)
    verdicts = []
    rec = Recorder()

    def observe(r: InferenceResult) -> None:
        rec.observe(r)
        verdicts.append(watch.observe(r))

    src = open_source(SourceConfig(kind="testpattern", width=64, height=48, fps=0, max_frames=4))
    smp = Sampler(SamplerConfig(strategies=["confidence"], confidence_threshold=0.6, max_per_minute=0,
                                max_per_hour=0, max_per_day=0, dedup_distance=-1))
    p = Pipeline(src, ModelHolder(model), smp, rec.sink, PipelineConfig(), observers=[observe])
    p.run()
    assert p.processed == 4 and p.errors == 4 and p.error_kinds == {"non_finite_scores": 4}
    assert all(r.error is not None and "non-finite" in r.error and r.scores is None for r in rec.results)
    assert rec.sampled == [] and smp.counters()["seen"] == 0
    assert verdicts[2] is not None and verdicts[2][0] == "rollback" and "non-finite" in verdicts[2][1]
