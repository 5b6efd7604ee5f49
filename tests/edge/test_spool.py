"""The durable spool: order, persistence, budget eviction, damaged records, sequence monotonicity."""

from __future__ import annotations

import logging
import resource
from pathlib import Path

import pytest

from edge.errors import FrameError, StorageError
from edge.uplink.spool import HEADER, Spool, decode_record, encode_record
from proto.errors import ConfigError

BIG = 10 * 1024 * 1024


def payloads(spool: Spool) -> list:
    return [p for _, p in spool.after(None, 10 ** 6)]


def test_fifo_order_and_sequences(tmp_path: Path) -> None:
    s = Spool(tmp_path, BIG, 1000)
    seqs = [s.append(lambda seq, i=i: f"rec{i}".encode()) for i in range(5)]
    assert seqs == [0, 1, 2, 3, 4]
    assert payloads(s) == [f"rec{i}".encode() for i in range(5)]
    assert [q for q, _ in s.after(2, 10)] == [3, 4]
    assert [q for q, _ in s.after(None, 2)] == [0, 1]
    s.remove(1)
    assert s.sequences() == [0, 2, 3, 4]
    assert s.stats() == (s.bytes, 4, 0)


def test_make_sees_its_sequence_and_failure_consumes_none(tmp_path: Path) -> None:
    s = Spool(tmp_path, BIG, 1000)
    assert s.append(lambda seq: str(seq).encode()) == 0

    def boom(seq: int) -> bytes:
        raise FrameError("nope")

    with pytest.raises(FrameError):
        s.append(boom)
    assert s.append(lambda seq: str(seq).encode()) == 1
    assert payloads(s) == [b"0", b"1"]


def test_persists_across_reopen_and_sequence_never_goes_back(tmp_path: Path) -> None:
    s = Spool(tmp_path, BIG, 1000)
    for i in range(4):
        s.append(lambda seq, i=i: b"x%d" % i)
    s.remove(0)
    s2 = Spool(tmp_path, BIG, 1000)
    assert s2.sequences() == [1, 2, 3]
    assert payloads(s2) == [b"x1", b"x2", b"x3"]
    assert s2.append(lambda seq: b"x4") == 4
    for q in s2.sequences():  # drain everything: the counter file must remember where we were
        s2.remove(q)
    assert len(s2) == 0
    s3 = Spool(tmp_path, BIG, 1000)
    assert s3.next_sequence == 5
    assert s3.append(lambda seq: b"x5") == 5


def test_count_budget_evicts_oldest_first_and_counts(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    s = Spool(tmp_path, BIG, 3)
    with caplog.at_level(logging.WARNING, logger="edge.uplink.spool"):
        for i in range(5):
            s.append(lambda seq, i=i: b"p%d" % i)
    assert payloads(s) == [b"p2", b"p3", b"p4"]
    assert s.stats()[1:] == (3, 2)
    assert sum("evicted oldest" in r.getMessage() for r in caplog.records) == 2


def test_byte_budget_evicts_oldest_first(tmp_path: Path) -> None:
    budget = 64 * 1024
    rec = 20 * 1024
    s = Spool(tmp_path, budget, 1000)
    for i in range(5):
        s.append(lambda seq, i=i: bytes([i]) * rec)
    left = payloads(s)
    # three records of rec + header fit in 64 KiB, four do not
    assert [p[0] for p in left] == [2, 3, 4]
    assert s.bytes <= budget
    assert s.stats()[2] == 2
    with pytest.raises(FrameError, match="larger than the spool budget"):
        s.append(lambda seq: b"z" * budget)


@pytest.mark.parametrize("damage", ["truncate", "garble", "empty"])
def test_damaged_record_is_skipped_with_a_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                  damage: str) -> None:
    s = Spool(tmp_path, BIG, 1000)
    for i in range(3):
        s.append(lambda seq, i=i: b"payload-%d" % i * 10)
    victim = sorted(tmp_path.glob("*.rec"))[1]
    blob = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(blob[: len(blob) - 7])
    elif damage == "garble":
        victim.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0xFF]))
    else:
        victim.write_bytes(b"")
    (tmp_path / ".00000000000000000099.rec.tmp4242").write_bytes(b"half a write")  # interrupted write before rename
    with caplog.at_level(logging.WARNING, logger="edge.uplink.spool"):
        s2 = Spool(tmp_path, BIG, 1000)
        got = s2.after(None, 10)
    assert [q for q, _ in got] == [0, 2]
    assert [p for _, p in got] == [b"payload-0" * 10, b"payload-2" * 10]
    assert s2.corrupt == 1
    assert not victim.exists()
    assert not (tmp_path / ".00000000000000000099.rec.tmp4242").exists()
    assert any("damaged record" in r.getMessage() and victim.name in r.getMessage() for r in caplog.records)
    assert s2.append(lambda seq: b"next") == 3


def test_record_codec_detects_each_kind_of_damage() -> None:
    rec = encode_record(b"hello")
    assert decode_record(rec) == b"hello"
    with pytest.raises(FrameError, match="truncated header"):
        decode_record(rec[: HEADER.size - 1])
    with pytest.raises(FrameError, match="bad magic"):
        decode_record(b"XXXX" + rec[4:])
    with pytest.raises(FrameError, match="torn write"):
        decode_record(rec[:-1])
    with pytest.raises(FrameError, match="checksum"):
        decode_record(rec[:-1] + b"H")


def test_evictions_are_counted_across_restarts(tmp_path: Path) -> None:
    s = Spool(tmp_path, BIG, 2)
    for i in range(5):
        s.append(lambda seq, i=i: b"e%d" % i)
    assert s.stats()[2] == 3
    again = Spool(tmp_path, BIG, 2)
    assert again.stats()[1:] == (2, 3)  # a crash loop cannot hide how much was evicted
    again.append(lambda seq: b"e5")
    assert Spool(tmp_path, BIG, 2).evictions == 4


def test_set_aside_moves_a_record_out_of_the_queue(tmp_path: Path) -> None:
    s = Spool(tmp_path, BIG, 1000, max_dead=2)
    for i in range(5):
        s.append(lambda seq, i=i: b"r%d" % i)
    where = s.set_aside(0)
    assert where is not None and where.parent == tmp_path / "dead" and decode_record(where.read_bytes()) == b"r0"
    assert s.sequences() == [1, 2, 3, 4] and s.set_aside(0) is None
    s.set_aside(1)
    s.set_aside(2)  # only max_dead are kept: the oldest goes (and counts as an eviction)
    assert [p.name[-6:] for p in s.dead_letters()] == ["01.rec", "02.rec"] and s.evictions == 1
    assert s.dead_lettered == 3  # a counter, not the files in dead/
    s.dead_letters()[0].rename(tmp_path / "resend-me.rec")  # an operator takes one out of dead/
    again = Spool(tmp_path, BIG, 1000)
    assert again.sequences() == [3, 4] and again.next_sequence == 5
    assert again.dead_lettered == 3 and len(again.dead_letters()) == 1  # the counter never goes down


def test_a_record_that_cannot_be_set_aside_stays_in_the_spool(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    s = Spool(tmp_path, BIG, 1000)
    for i in range(3):
        s.append(lambda seq, i=i: b"r%d" % i)
    (tmp_path / "dead").write_text("in the way")  # dead/ cannot be created
    with caplog.at_level(logging.ERROR, logger="edge.uplink.spool"):
        assert s.set_aside(0) is None and s.set_aside(0) is None
    assert s.sequences() == [0, 1, 2] and payloads(s)[0] == b"r0"  # kept, not deleted uncounted
    assert len([r for r in caplog.records if "stays in the spool" in r.getMessage()]) == 1
    assert Spool(tmp_path, BIG, 1000).sequences() == [0, 1, 2]


def test_a_directory_that_cannot_be_used_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"cannot use the spool directory .*file/spool: .*check \[device\] data_dir"):
        Spool(blocker / "spool", BIG, 10)


def test_a_write_the_file_system_refuses_is_a_storage_error(tmp_path: Path) -> None:
    s = Spool(tmp_path, BIG, 1000)
    s.append(lambda seq: b"small")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # a real EFBIG from the kernel past 4 KiB
    try:
        with pytest.raises(StorageError, match="cannot write a frame"):
            s.append(lambda seq: b"x" * 10000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert s.sequences() == [0] and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert s.append(lambda seq: b"x" * 10000) == 1  # the failed write consumed no sequence
