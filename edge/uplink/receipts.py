"""What the hub's storage receipts do to the spool (docs/adr/0019-storage-receipts.md).

The publisher (edge.uplink.publisher) keeps a frame in the spool after the broker's PUBACK until a
``Receipt`` from the hub names it. :class:`Receipts` is that side of the publisher: which topics it
reads (the device's receipts, the hubs' retained announcement and resend requests), whether this
connection's hubs send receipts (``[mqtt] delete_on``), what a PUBACK, a receipt, a refusal or a resend
request does to a spooled frame, and the counters telemetry reports. :class:`ReceiptBook` holds, for
every such frame, when it is due again: ``timeout_s`` after its PUBACK, doubling with each resend up to
``timeout_max_s`` (a hub that is down for an hour costs a handful of copies per frame, not one per
timeout). A frame is *struck* when it comes due although the hub receipted other frames of this device
since its PUBACK (the hub is alive and did not store it); after ``max_strikes`` strikes the publisher sets
it aside instead of resending it forever (a frame the hub can never name in a receipt: e.g. one over the
hub's size limit behind a broker that takes it).

``delete_on = "auto"`` decides per connection: the hubs publish a retained ``HubAnnouncement``; it
arrives right after the SUBACK of our subscription, before the PUBACK of the birth status the publisher
sends behind that subscription (a broker answers one client's packets in order), so at that PUBACK the
connection knows. Frames acknowledged before that (none, with an in-order broker) wait for it.

Used from the MQTT I/O thread only (no lock). The clock is injectable for tests.
"""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Set, Tuple

from edge.config import MqttConfig
from edge.logonce import OncePerKind
from edge.uplink.spool import Spool
from proto import kestrel_pb2, topics

log = logging.getLogger("edge.uplink.publisher")  # the publisher's log: one story per frame

Clock = Callable[[], float]

DELETE_ON_AUTO = "auto"        # keep frames until their receipt when the hub announces receipts
DELETE_ON_RECEIPT = "receipt"  # always keep frames until their receipt
DELETE_ON_PUBACK = "puback"    # delete on the broker's PUBACK (hubs without receipts)
DELETE_ON = (DELETE_ON_AUTO, DELETE_ON_RECEIPT, DELETE_ON_PUBACK)


@dataclass
class _Entry:
    sends: int = 1        # how often the frame went out (1: only the first send)
    since: float = 0.0    # strikes count receipts for other frames after this (its last PUBACK, or a resend request)
    due_at: float = 0.0   # when it goes out again (while not being resent)
    token: int = 0        # the heap item carrying this token is the live one
    strikes: int = 0


class ReceiptBook:
    """Frames waiting for their receipt, with a heap of due times: :meth:`due` costs O(log n) per frame
    handed out and nothing while none is due (no scan of the waiting frames on the I/O thread's turns)."""

    def __init__(self, timeout_s: float, timeout_max_s: float, clock: Clock = time.monotonic) -> None:
        self.timeout_s = float(timeout_s)
        self.timeout_max_s = max(float(timeout_max_s), self.timeout_s)
        self._clock = clock
        self._entries: Dict[int, _Entry] = {}
        self._resending: Set[int] = set()  # sent again, no PUBACK yet: no timer
        self._heap: List[Tuple[float, int, int]] = []  # (due_at, seq, token); stale items are skipped
        self.last_receipt_at = float("-inf")  # the last receipt naming a frame of ours (monotonic)

    def __contains__(self, seq: object) -> bool:
        return seq in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def awaiting(self) -> int:
        """Frames the broker acknowledged that wait for their receipt (not those being resent)."""
        return len(self._entries) - len(self._resending)

    def _schedule(self, seq: int, e: _Entry, due_at: float) -> None:
        e.due_at = due_at
        e.token += 1
        heapq.heappush(self._heap, (due_at, seq, e.token))

    def acked(self, seq: int) -> None:
        """The broker acknowledged ``seq`` (first send or a resend): its receipt is due within the timeout,
        doubled for every earlier send."""
        now = self._clock()
        e = self._entries.get(seq)
        if e is None:
            e = self._entries[seq] = _Entry()
        self._resending.discard(seq)
        e.since = now
        self._schedule(seq, e, now + min(self.timeout_max_s, self.timeout_s * 2 ** (e.sends - 1)))

    def forget(self, seq: int) -> None:
        """Receipted, refused, set aside or gone from the spool (its heap item goes stale)."""
        self._entries.pop(seq, None)
        self._resending.discard(seq)

    def receipt_seen(self) -> None:
        self.last_receipt_at = self._clock()

    def due(self, limit: int) -> List[int]:
        """Up to ``limit`` frames whose receipt is overdue, the longest overdue first. They stay due until
        :meth:`resending` or :meth:`forget`."""
        now = self._clock()
        out: List[Tuple[float, int, int]] = []
        while self._heap and len(out) < limit and self._heap[0][0] <= now:
            item = heapq.heappop(self._heap)
            e = self._entries.get(item[1])
            if e is not None and e.token == item[2] and item[1] not in self._resending:
                out.append(item)
        for item in out:  # still due until the caller sends them
            heapq.heappush(self._heap, item)
        return [seq for _, seq, _ in out]

    def strike(self, seq: int) -> int:
        """``seq`` is due: one strike more when the hub receipted other frames since its PUBACK (it is up
        and did not store this one); the strikes so far."""
        e = self._entries[seq]
        if self.last_receipt_at > e.since:
            e.strikes += 1
        return e.strikes

    def resending(self, seq: int) -> None:
        """``seq`` went out again: no timer until its PUBACK."""
        e = self._entries[seq]
        e.sends += 1
        e.token += 1
        self._resending.add(seq)

    def resend_all_now(self) -> int:
        """The hub asked (its session was lost): every frame waiting for a receipt is due now (without a
        strike: the hub did not skip it); how many."""
        now = self._clock()
        n = 0
        for seq, e in self._entries.items():
            if seq not in self._resending:
                e.since = now
                self._schedule(seq, e, now)
                n += 1
        return n

    def link_lost(self) -> None:
        """The connection dropped: resends in flight got no PUBACK, they are due at once on the next one."""
        now = self._clock()
        resending, self._resending = self._resending, set()
        for seq in resending:
            e = self._entries.get(seq)
            if e is not None:
                self._schedule(seq, e, now)


def parse(payload: bytes, message: type) -> Optional[object]:
    """A protobuf message of type ``message`` from ``payload``; None when it does not parse."""
    msg = message()
    try:
        msg.ParseFromString(payload)
    except Exception:  # noqa: BLE001 - DecodeError and friends: someone else's bytes on our topic
        return None
    return msg


def receipts_announced(payload: bytes) -> Optional[bool]:
    """What a retained HubAnnouncement says about receipts: False for an empty (withdrawn) one, None when
    it does not parse."""
    if not payload:
        return False
    msg = parse(payload, kestrel_pb2.HubAnnouncement)
    return None if msg is None else bool(getattr(msg, "receipts", False))


Subscription = Tuple[str, Callable[[str, bytes], None], int]


class Receipts:
    """The receipt side of one publisher. ``notify()`` wakes the publisher's waiters (flush);
    ``forget_suspect(seq)`` drops a frame from the publisher's suspects."""

    def __init__(self, cfg: MqttConfig, device_id: str, spool: Spool, notify: Callable[[], None],
                 forget_suspect: Callable[[int], object], clock: Clock = time.monotonic) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.spool = spool
        self.mode = cfg.delete_on
        self.book = ReceiptBook(cfg.receipt_timeout_s, cfg.receipt_timeout_max_s, clock)
        self._notify = notify
        self._forget_suspect = forget_suspect
        # whether this connection's hubs send receipts: None until its birth PUBACK settles it (auto)
        self.hub_receipts: Optional[bool] = self.mode == DELETE_ON_RECEIPT
        self._announced: Optional[bool] = None  # what this connection's retained announcement said
        self._undecided: List[int] = []  # acknowledged before this connection knew
        self._logged: Optional[bool] = None  # what the log last said about receipts
        self._refusals = OncePerKind(log)  # one ERROR line per kind of refusal
        self.received = 0           # Receipt messages
        self.frames_receipted = 0   # frames a receipt let go
        self.frames_resent = 0      # frames published again for want of a receipt
        self.refused = 0            # frames set aside because the hub refused them (or never receipted them)

    def subscriptions(self) -> List[Subscription]:
        """What the publisher subscribes to on every connection, before its birth status ([] for puback)."""
        if self.mode == DELETE_ON_PUBACK:
            return []
        return [(topics.HUB_ANNOUNCE, self.on_announcement, topics.QOS_HUB),
                (topics.receipts(self.device_id), self.on_receipt, topics.QOS_RECEIPTS),
                (topics.HUB_RESEND, self.on_resend_request, topics.QOS_HUB)]

    # -- the connection ---------------------------------------------------------------------------

    def connected(self) -> None:
        self._announced = None
        if self.mode == DELETE_ON_AUTO:
            self.hub_receipts = None  # until this connection's birth PUBACK (or a receipt) says

    def birth_acked(self) -> None:
        """The PUBACK of this connection's birth status: a retained announcement, if any, came before it."""
        if self.mode == DELETE_ON_AUTO:
            self._settle(bool(self._announced))

    def link_lost(self) -> None:
        self.book.link_lost()
        if self.hub_receipts is None and self._undecided:
            self._settle(True)  # undecided when the link broke: keep them until a receipt

    def _settle(self, on: bool) -> None:
        if on != self._logged:  # once per change, not once per connection
            self._logged = on
            log.info("publisher: %s", "the hub sends storage receipts: a frame leaves the spool once the hub has "
                     "stored it" if on else "no hub on this broker announces storage receipts: a frame leaves "
                     "the spool on the broker's PUBACK ([mqtt] delete_on = \"auto\")")
        self.hub_receipts = on
        undecided, self._undecided = self._undecided, []
        for seq in undecided:
            self._after_puback(seq)
        self._notify()

    # -- frames -----------------------------------------------------------------------------------

    def acked(self, seq: int) -> None:
        """The broker acknowledged frame ``seq``: keep it for its receipt, or delete it (puback)."""
        if self.hub_receipts is None and seq in self.spool:
            self._undecided.append(seq)
        else:
            self._after_puback(seq)

    def _after_puback(self, seq: int) -> None:
        if seq not in self.spool:  # its receipt came first
            self.book.forget(seq)
        elif self.hub_receipts:
            self.book.acked(seq)
        else:
            self.book.forget(seq)
            self.spool.remove(seq)

    def held(self, seq: int) -> bool:
        """Acknowledged on some connection and waiting for its receipt (sent again only when due)."""
        return seq in self.book

    def due(self, room: int) -> List[Tuple[int, bytes]]:
        """Frames to publish again now (oldest first, at most ``room``), marked as being resent. A frame
        struck out (see the module doc) is set aside instead."""
        out: List[Tuple[int, bytes]] = []
        for seq in self.book.due(room):
            if self.book.strike(seq) >= self.cfg.max_send_attempts:
                self._set_aside(seq, f"no receipt after {self.cfg.max_send_attempts} sends while the hub receipted "
                                "other frames (check the hub's max_payload_bytes and the broker's "
                                "max_packet_size)", "no_receipt")
                continue
            payload = self.spool.read(seq)
            if payload is None:
                self.book.forget(seq)
                continue
            out.append((seq, payload))
        return out

    def resending(self, seq: int) -> None:
        self.book.resending(seq)
        self.frames_resent += 1

    # -- the hub's messages -----------------------------------------------------------------------

    def on_announcement(self, topic: str, payload: bytes) -> None:
        said = receipts_announced(payload)
        if said is None:
            log.warning("publisher: unreadable hub announcement on %s (%d bytes): ignored", topic, len(payload))
            return
        self._announced = said
        if self.mode == DELETE_ON_AUTO and self.hub_receipts is not None:
            self._settle(said)  # a hub announcing (or withdrawing) receipts while we are connected

    def on_receipt(self, topic: str, payload: bytes) -> None:
        msg = parse(payload, kestrel_pb2.Receipt)
        if not isinstance(msg, kestrel_pb2.Receipt) or (msg.device_id and msg.device_id != self.device_id):
            log.warning("publisher: unreadable receipt on %s (%d bytes): ignored", topic, len(payload))
            return
        self.received += 1
        if self.mode == DELETE_ON_AUTO and not self.hub_receipts:
            self._settle(True)  # a receipt is word enough
        named = 0
        for frame_id in msg.frame_ids:
            seq = self.spool.seq_of(frame_id)
            if seq is None:
                continue  # receipted before (a redelivery's receipt) or evicted
            named += 1
            self.book.forget(seq)
            self._forget_suspect(seq)
            self.spool.remove(seq)
            self.frames_receipted += 1
        for refused in msg.refused:
            seq = self.spool.seq_of(refused.frame_id)
            if seq is not None:
                named += 1
                self._set_aside(seq, f"the hub refused it for good ({refused.reason})", refused.reason or "refused")
        if named:
            self.book.receipt_seen()
        self._notify()

    def on_resend_request(self, topic: str, payload: bytes) -> None:
        msg = parse(payload, kestrel_pb2.ResendRequest)
        n = self.book.resend_all_now()
        reason = getattr(msg, "reason", "") if msg is not None else ""
        log.warning("publisher: the hub asked for a resend (%s): %d frames waiting for a receipt go out again",
                    reason or "no reason given", n)

    def _set_aside(self, seq: int, why: str, kind: str) -> None:
        self.book.forget(seq)
        self._forget_suspect(seq)
        where = self.spool.set_aside(seq)
        if where is None:
            return
        self.refused += 1
        self._refusals.log(kind, logging.ERROR, "publisher: frame seq=%d set aside as %s: %s (%d set aside so "
                           "far; more of this kind are logged at DEBUG)", seq, where, why, self.spool.dead_lettered)

    # -- figures ----------------------------------------------------------------------------------

    def oldest_age_s(self) -> float:
        """Age of the oldest frame not receipted yet (the oldest in the spool; 0 when it is empty)."""
        return self.spool.oldest_age_s()
