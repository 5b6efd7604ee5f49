"""The dashboard benchmark's code path as a functional check (tests/bench/bench_dashboard.py, small): a store
seeded directly, a real hub process on it, every measured page over real HTTP answers the right thing.
No timing is asserted here: the p95 figures are `make bench`'s (bench_dashboard)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict

import pytest

from tests.bench import bench_dashboard

pytestmark = pytest.mark.timeout(300)


def test_the_benchmark_pages_answer_correctly_on_a_seeded_store(tmp_path: Path) -> None:
    seen: Dict[str, Any] = {}

    def check(name: str, r: Any) -> None:
        assert r.status_code == 200, (name, r.text[:300])
        seen[name] = r

    out = bench_dashboard.run_backend(tmp_path, "", frames=3000, devices=50, requests=2, check=check)
    assert set(out["pages"]) == set(seen) and out["frames"] == 3000
    first = seen["frames_json"].json()["frames"]
    assert len(first) == 48 and all(f["label"] is None and not f["unusable"] for f in first)
    times = [f["capture_time_ms"] for f in first]
    assert times == sorted(times, reverse=True)
    assert first[0]["frame_id"].endswith("-2999")  # the newest frame (k = 2999 is unlabelled: 2999 % 3 != 0)
    deep = seen["frames_json_page_21"].json()["frames"]
    assert len(deep) == 48 and deep[0]["capture_time_ms"] < times[-1]
    assert seen["labels_html"].text.count('class="card') == 48
    assert len(re.findall(r'<tr data-device="cam-\d{3}"', seen["fleet_html"].text)) == 50
    device_cards = re.findall(r'<span title="device">([^<]+)</span>', seen["labels_device"].text)
    in_device = sum(1 for k in range(3000) if k % 50 == 1 and k % 3)  # cam-001's unlabelled frames
    assert len(device_cards) == min(48, in_device) == 40 and set(device_cards) == {"cam-001"}
    scores = [float(s) for s in re.findall(r'<li><span class="name">[^<]*</span><span class="bar">.*?'
                                           r'<span class="score">([0-9.]+)</span></li>',
                                           seen["labels_least_confident"].text)][::3]
    assert len(scores) == 48 and scores == sorted(scores)
    assert len(seen["devices_json"].json()) == 50
