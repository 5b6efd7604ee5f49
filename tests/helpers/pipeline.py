"""What the pipeline tests record: every inference result and every sampled frame (thread-safe)."""

from __future__ import annotations

import threading
from typing import Dict, List

from edge.pipeline.loop import InferenceResult, SampledFrame


class Recorder:
    def __init__(self) -> None:
        self.results: List[InferenceResult] = []
        self.sampled: List[SampledFrame] = []
        self.lock = threading.Lock()

    def observe(self, r: InferenceResult) -> None:
        with self.lock:
            self.results.append(r)

    def sink(self, s: SampledFrame) -> None:
        with self.lock:
            self.sampled.append(s)

    def by_source(self) -> Dict[str, List[InferenceResult]]:
        out: Dict[str, List[InferenceResult]] = {}
        with self.lock:
            for r in self.results:
                out.setdefault(r.source, []).append(r)
        return out
