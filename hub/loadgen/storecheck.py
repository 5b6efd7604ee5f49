"""What the store holds of a load generator run: every frame of the run (frame id ``<run>-<device>-<seq>``), read
through the store's keyset-paged frame query (any backend), against what the run published.

* ``lost``: published, not in the store;
* ``stored_twice``: a (device, sequence number) of the run in more than one record. The store keys frames by
  frame_id, so this can only be non-zero if a frame were stored under a second id: counted anyway, from the
  records' own ``sequence`` field, not from the ids;
* ``unexpected``: records of the run with a sequence number the run never published.
"""

from __future__ import annotations

from typing import Any, Dict, List

from hub.loadgen import frames
from hub.store.base import Store
from hub.store.query import MAX_LIMIT, FrameQuery

DEVICES_PER_QUERY = 50
SAMPLE = 10  # frame ids named per kind of problem


def count(store: Store, run_id: str, sent: Dict[str, int], since_ms: int) -> Dict[str, Any]:
    """``sent``: device id -> frames published (sequence numbers 0 .. n-1); ``since_ms``: no frame of the run was
    captured before this."""
    seen: Dict[str, Dict[int, int]] = {d: {} for d in sent}
    records = 0
    devices = sorted(sent)
    for i in range(0, len(devices), DEVICES_PER_QUERY):
        q = FrameQuery(device_ids=devices[i:i + DEVICES_PER_QUERY], label_state="any", since_ms=since_ms,
                       limit=MAX_LIMIT)
        while True:
            page = store.query_frames(q.validate())
            for f in page.frames:
                dev = seen.get(f.device_id)
                if dev is None or not f.frame_id.startswith(f"{run_id}-{f.device_id}-"):
                    continue  # another run's, or another sender's frame
                records += 1
                dev[int(f.sequence)] = dev.get(int(f.sequence), 0) + 1
            if page.next is None:
                break
            q.after = page.next
    lost: List[str] = []
    n_lost = twice = unexpected = stored = 0
    for d in devices:
        have = seen[d]
        for seq in range(sent[d]):
            c = have.get(seq, 0)
            if c == 0:
                n_lost += 1
                if len(lost) < SAMPLE:
                    lost.append(frames.frame_id(run_id, d, seq))
            else:
                stored += 1
                twice += c - 1
        unexpected += sum(c for seq, c in have.items() if not 0 <= seq < sent[d])
    return {"published": sum(sent.values()), "stored": stored, "lost": n_lost, "stored_twice": twice,
            "unexpected": unexpected, "records": records, "lost_sample": lost}
