"""Writing one batch to the store, and telling a store that is down from one that refuses a record.

``write_batch`` makes one store call for the whole batch (Store.apply_batch: one transaction in SQLite).
When the store refuses the batch (StoreError), the device writes go alone and the frames one by one,
and a frame is given up on (``refused``: the pipeline dead-letters it) only when the failure is clearly
about that record: another frame of the batch went in, or, when all of them failed POISON_ATTEMPTS
times, a probe write succeeds. ``BatchState`` carries what earlier attempts achieved across retries."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

from hub.errors import StoreError, StoreUnavailable
from hub.store.base import FrameRecord, Store
from hub.store.series import SeriesPoint

log = logging.getLogger("hub.ingest.pipeline")  # the ingest's log, as before the split

POISON_ATTEMPTS = 3  # a batch whose every frame the store refuses is retried this often before a probe


@dataclass
class BatchState:
    """What earlier attempts at one batch already achieved: a retry never stores, counts or
    dead-letters a frame twice."""
    outcomes: Dict[int, str] = field(default_factory=dict)   # batch index -> stored/duplicate/conflict/refused
    details: Dict[int, str] = field(default_factory=dict)    # batch index -> why (conflict/refused)
    dead_lettered: Set[int] = field(default_factory=set)      # batch indexes


def record_outcome(state: BatchState, i: int, f: FrameRecord, owner: Optional[str]) -> None:
    """Record what the store said of frame ``i``: stored now (None), or the device its id is stored for:
    a redelivery when that is the frame's own device, else a conflict (decided from the same store
    call that found the id, so a failure between the two cannot let a forged id pass as a duplicate)."""
    if owner is None:
        state.outcomes[i] = "stored"
    elif owner == f.device_id:
        state.outcomes[i] = "duplicate"
    else:
        state.outcomes[i] = "conflict"
        state.details[i] = (f"frame_id {f.frame_id!r} from device {f.device_id!r} is already "
                            f"stored for device {owner!r}")


def write_batch(store: Store, frames: List[Tuple[int, FrameRecord]], devices: Dict[str, Dict[str, object]],
                seen: Dict[str, int], state: BatchState, attempt: int, points: Sequence[SeriesPoint] = ()) -> None:
    """Write the frames not stored by an earlier attempt, the merged device updates, the last_seen
    raises and the telemetry series points; record each frame's outcome in ``state``. Raises (so the
    batch is retried) when the store fails as a whole."""
    todo = [(i, f) for i, f in frames if i not in state.outcomes]
    if not todo and not devices and not seen and not points:
        return
    try:
        owners = store.apply_batch([f for _, f in todo], devices, seen, points)
    except StoreUnavailable:
        raise
    except StoreError as exc:
        if not todo:
            raise
        log.warning("the store refused a batch of %d frames (%s); trying them one by one", len(todo), exc)
    else:
        for (i, f), owner in zip(todo, owners):
            record_outcome(state, i, f, owner)
        return
    if devices or seen or points:
        store.apply_batch([], devices, seen, points)  # raises if these are what the store refuses
    refused: List[Tuple[int, FrameRecord, StoreError]] = []
    for i, f in todo:
        try:
            owner = store.add_frames([f])[0]
        except StoreUnavailable:
            raise
        except StoreError as exc:
            refused.append((i, f, exc))
            continue
        record_outcome(state, i, f, owner)
    if refused:
        some_went_in = any(i in state.outcomes for i, _ in frames)
        if not some_went_in:
            if attempt < POISON_ATTEMPTS:
                raise refused[0][2]
            # the store may be broken as a whole: a probe write tells (raises if it is)
            store.upsert_device(refused[0][1].device_id)
        for i, f, why in refused:
            state.outcomes[i] = "refused"
            state.details[i] = f"the store refused frame {f.frame_id!r}: {why}"
