"""The device's sampling threshold, chosen from held-out data. Pure: numbers in, numbers out.

The int8 model's scores on the held-out split (as the device computes them: edge runtime, edge
preprocessing) and the truth give, for every candidate threshold of each sampler rule, how many frames
the rule would send to the hub and how many of the model's errors would be among them. The rules are
the device's own functions (edge.inference.uncertainty, re-exported by edge.inference), so a frame the
sweep counts as sent is one the device's sampler would send.

The choice: the candidate that sends at least ``errors_to_catch`` of the held-out errors with the fewest
frames. Its held-out caught share is optimistic (the threshold was placed just above the errors it needed),
so each choice also carries a leave-one-out estimate of the share it catches on new frames
(:func:`expected_caught`). The sent and caught counts both grow as a rule gets more eager (confidence and margin: higher
threshold; entropy: lower), so that is the least eager candidate that reaches the share. The confidence
rule's choice becomes the bundle's ``default_threshold`` unless the trainer config sets one (the
config wins; :func:`resolve`). No errors on held-out: nothing to choose from, the device's built-in
default applies.

Every share comes with a 95 % Wilson interval (scipy): from n held-out images and e errors that is
what the held-out data can say about a camera that sees the same kind of images.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from edge.inference import DEFAULT_CONFIDENCE_THRESHOLD, FIRES, RULES, SENDS_MORE_WHEN_HIGHER, rule_values

CANDIDATES: Tuple[float, ...] = tuple(round(i / 100.0, 2) for i in range(101))  # 0.00 .. 1.00
FEW_ERRORS = 10        # fewer held-out errors than this: the caught share is a rough estimate (warned)
CONFIDENCE_LEVEL = 0.95


def wilson(k: int, n: int, level: float = CONFIDENCE_LEVEL) -> Optional[Tuple[float, float]]:
    """The Wilson score interval of a proportion k/n (None when n = 0)."""
    if n <= 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def frame_values(scores: np.ndarray) -> Dict[str, List[float]]:
    """Per held-out frame, the value each rule compares with its threshold (the device's functions)."""
    vals = [rule_values(s) for s in np.asarray(scores, dtype=np.float64)]
    return {rule: [float(v[i]) for v in vals] for i, rule in enumerate(RULES)}


def point(values: np.ndarray, errors: np.ndarray, rule: str, threshold: float) -> Dict[str, Any]:
    """What ``rule`` at ``threshold`` sends on these frames: counts, shares and their 95 % intervals."""
    sent = np.asarray(FIRES[rule](np.asarray(values, dtype=np.float64), float(threshold)), dtype=bool)
    errors = np.asarray(errors, dtype=bool)
    n, n_err = int(sent.size), int(errors.sum())
    k_sent, k_caught = int(sent.sum()), int((sent & errors).sum())
    return {"threshold": float(threshold), "sent": k_sent, "caught": k_caught,
            "sent_share": k_sent / n if n else 0.0, "caught_share": k_caught / n_err if n_err else None,
            "sent_ci": wilson(k_sent, n), "caught_ci": wilson(k_caught, n_err)}


def sweep(values: np.ndarray, errors: np.ndarray, rule: str,
          candidates: Tuple[float, ...] = CANDIDATES) -> List[Dict[str, Any]]:
    """(threshold, frames sent, errors among them) for every candidate, in threshold order."""
    v = np.asarray(values, dtype=np.float64)
    e = np.asarray(errors, dtype=bool)
    fires = FIRES[rule]
    out = []
    for t in candidates:
        sent = np.asarray(fires(v, t), dtype=bool)
        out.append({"threshold": float(t), "sent": int(sent.sum()), "caught": int((sent & e).sum())})
    return out


def choose(points: List[Dict[str, Any]], n_errors: int, rule: str, target: float) -> Optional[Dict[str, Any]]:
    """The candidate sending at least ``target`` of the errors with the fewest frames (ties: the least eager
    threshold). Without errors: None. When no candidate reaches the target: the one catching the most (with
    ``target_met`` False)."""
    if n_errors <= 0:
        return None
    ordered = points if SENDS_MORE_WHEN_HIGHER[rule] else list(reversed(points))  # least eager first
    for p in ordered:
        if p["caught"] / n_errors >= target - 1e-12:
            return dict(p, target_met=True)
    best = max(p["caught"] for p in ordered)
    first = next(p for p in ordered if p["caught"] == best)
    return dict(first, target_met=False)


def expected_caught(values: np.ndarray, errors: np.ndarray, rule: str, target: float) -> Optional[Dict[str, Any]]:
    """The share of errors the data's choice catches on *new* frames, estimated by leave-one-out: for each
    held-out error, choose the threshold from the other errors alone (same rule: :func:`choose`, the device
    default when none is left) and see whether it catches the one left out.

    The held-out caught share at the chosen threshold is optimistic: the threshold sits just above the last
    error it needed. Leaving each error out of its own choice removes that bias (None without errors)."""
    v_err = np.asarray(values, dtype=np.float64)[np.asarray(errors, dtype=bool)]
    n_err = int(v_err.size)
    if n_err == 0:
        return None
    hits = 0
    for i in range(n_err):
        rest = np.delete(v_err, i)
        ch = choose(sweep(rest, np.ones(rest.size, dtype=bool), rule), int(rest.size), rule, target)
        t = ch["threshold"] if ch is not None else (DEFAULT_CONFIDENCE_THRESHOLD if rule == "confidence" else None)
        hits += int(t is not None and bool(FIRES[rule](float(v_err[i]), t)))
    return {"caught": hits, "n_errors": n_err, "caught_share": hits / n_err, "caught_ci": wilson(hits, n_err)}


def analyse(scores: np.ndarray, labels: np.ndarray, target: float) -> Dict[str, Any]:
    """The whole sweep for evaluate.json: per rule the curve and the choice; the per-frame values (so a
    configured threshold can be placed on the curve later); warnings."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    errors = scores.argmax(1) != labels
    n, n_err = int(len(labels)), int(errors.sum())
    values = frame_values(scores)
    rules: Dict[str, Any] = {}
    for rule in RULES:
        pts = sweep(np.array(values[rule]), errors, rule)
        ch = choose(pts, n_err, rule, target)
        if ch is not None:
            ch = dict(point(np.array(values[rule]), errors, rule, ch["threshold"]), target_met=ch["target_met"],
                      expected=expected_caught(np.array(values[rule]), errors, rule, target))
        rules[rule] = {"points": pts, "chosen": ch}
    warnings: List[str] = []
    conf = rules["confidence"]["chosen"]
    if n_err == 0:
        warnings.append(f"the int8 model made no errors on the {n} held-out images: there is nothing to choose "
                        f"the sampling threshold from, so the bundle gets the device default "
                        f"{DEFAULT_CONFIDENCE_THRESHOLD} unless [gate] default_threshold is set")
    else:
        if not conf["target_met"]:
            warnings.append(f"no confidence threshold sends {target:.0%} of the held-out errors (the model is "
                            f"confidently wrong on some): the best, {conf['threshold']:.2f}, sends "
                            f"{conf['caught']} of {n_err}")
        if n_err < FEW_ERRORS:
            lo, hi = conf["expected"]["caught_ci"]
            warnings.append(f"the sampling threshold rests on only {n_err} held-out error"
                            f"{'s' if n_err != 1 else ''}: the share of errors it catches on new frames is "
                            f"somewhere in {lo:.0%}..{hi:.0%} (95 %); more held-out data makes it firmer")
    return {"n": n, "n_errors": n_err, "target": float(target), "candidates": len(CANDIDATES),
            "rules": rules, "frames": dict(values, error=[bool(x) for x in errors]),
            "chosen": conf["threshold"] if conf is not None else None, "warnings": warnings}


def resolve(sweep_result: Dict[str, Any], configured: Optional[float]) -> Dict[str, Any]:
    """The threshold the bundle carries and why: the configured one wins, else the data's choice, else the
    device default. With what the held-out frames say it sends and catches at that threshold."""
    if configured is not None:
        value, source = float(configured), "config"
    elif sweep_result.get("chosen") is not None:
        value, source = float(sweep_result["chosen"]), "data"
    else:
        value, source = DEFAULT_CONFIDENCE_THRESHOLD, "device default"
    frames = sweep_result["frames"]
    at = point(np.array(frames["confidence"]), np.array(frames["error"]), "confidence", value)
    # what to expect on new frames: the leave-one-out estimate for the data's choice (chosen on these very
    # errors); a configured or default threshold was not, so its held-out share is already fair
    expected = (sweep_result["rules"]["confidence"]["chosen"] or {}).get("expected") if source == "data" else None
    if expected is None:
        expected = {"caught": at["caught"], "n_errors": sweep_result["n_errors"],
                    "caught_share": at["caught_share"], "caught_ci": at["caught_ci"]}
    return dict(at, source=source, target=sweep_result["target"], n=sweep_result["n"],
                n_errors=sweep_result["n_errors"], expected=expected)
