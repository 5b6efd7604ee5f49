"""Self-test of a staged model before the switch: the bundle's own cases, within tolerance and budget."""

from __future__ import annotations

import base64
import time
from typing import Any, Dict, List

import numpy as np

from edge.errors import SelfTestError


def run_self_test(model: Any, self_test: Any, *, latency_budget_ms: float, min_cases: int = 1,
                  max_tolerance: float = 1.0) -> Dict[str, Any]:
    """Run every case on ``model`` (an edge.inference.runtime.Model); return figures or raise SelfTestError.

    The device sets the limits; a bundle may only make them stricter: the latency budget is the
    smaller of the manifest's ``latency_budget_ms`` and ``latency_budget_ms`` (the device config),
    the tolerance the smaller of the manifest's and ``max_tolerance``, and a bundle with fewer than
    ``min_cases`` cases fails. Any non-finite score fails.
    """
    cases: List[Any] = list(_get(self_test, "cases", None) or [])
    if len(cases) < min_cases:
        raise SelfTestError(f"the bundle has {len(cases)} self-test case(s); this device requires at least "
                            f"{min_cases} (re-package it with the trainer, which computes them)")
    tolerance = min(float(_get(self_test, "tolerance", 0.05)), float(max_tolerance))
    own = _get(self_test, "latency_budget_ms", None)
    budget = float(latency_budget_ms) if own is None else min(float(own), float(latency_budget_ms))
    spec = model.spec
    dtype = np.dtype(spec.dtype)
    shape = tuple(int(s) for s in spec.shape)
    worst_diff = 0.0
    worst_ms = 0.0
    for i, case in enumerate(cases):
        try:
            raw = _get(case, "input")
            if isinstance(raw, str):
                raw = base64.b64decode(raw)
            x = np.frombuffer(raw, dtype=dtype).reshape(shape)
            expected = np.asarray(_get(case, "expected"), dtype=np.float32).reshape(-1)
        except (KeyError, ValueError, TypeError) as exc:
            raise SelfTestError(f"self-test case {i} is malformed: {exc}") from exc
        if i == 0:
            model.invoke(x)  # warm-up: the first invoke pays for allocation
        t0 = time.perf_counter()
        got = model.invoke(x)
        ms = (time.perf_counter() - t0) * 1000.0
        if got.shape != expected.shape:
            raise SelfTestError(f"self-test case {i}: model gives {got.size} scores, "
                                f"expected {expected.size}")
        if not bool(np.all(np.isfinite(got))):
            raise SelfTestError(f"self-test case {i}: the model gives non-finite scores (NaN or infinity)")
        diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
        worst_diff = max(worst_diff, diff)
        worst_ms = max(worst_ms, ms)
        if diff > tolerance:
            raise SelfTestError(f"self-test case {i}: scores differ by {diff:.4f} (> tolerance {tolerance})")
        if ms > budget:
            raise SelfTestError(f"self-test case {i}: {ms:.1f} ms exceeds the latency budget {budget:.0f} ms")
    return {"cases": len(cases), "max_diff": worst_diff, "max_latency_ms": worst_ms, "budget_ms": budget}


def _get(obj: Any, key: str, default: Any = KeyError) -> Any:
    """Read a field from the manifest's dataclass (proto.manifest) or its plain-dict form."""
    if obj is None:
        value = default
    elif isinstance(obj, dict):
        value = obj.get(key, default)
    else:
        value = getattr(obj, key, default)
    if value is KeyError:
        raise KeyError(key)
    return value
