"""The bundle's container: a strict, canonical subset of POSIX ustar tar, written and parsed in memory.

``write_container`` packs members (name, bytes) in the order given, with exactly one header layout
and zero padding; ``parse_container`` reads a container back as (name, memoryview) pairs without
copying or extracting anything, and refuses (``bad_container``, ``truncated``, ``not_a_bundle``,
``too_large``) anything but that one canonical form of flat, plain regular files: no links,
devices, directories, pax/GNU headers, duplicate names or data hidden in ignored fields. It knows
nothing of manifests or signatures (proto.manifest, proto.bundle); its name rule, member limits and
refusals are proto.manifest's.
"""

from __future__ import annotations

from typing import Any, List, Tuple

from proto.manifest import _NAME_RE, MAX_FILE_BYTES, MAX_MEMBERS, _full, refuse

BLOCK = 512


def _octal(value: int, width: int) -> bytes:
    s = b"%0*o" % (width - 1, value)
    if len(s) != width - 1:
        raise ValueError(f"value {value} does not fit a {width}-byte tar field")
    return s + b"\0"


def _header(name: str, size: int) -> bytes:
    raw_name = name.encode("ascii")
    if len(raw_name) > 100:
        raise ValueError(f"member name too long: {name!r}")
    h = bytearray(BLOCK)
    h[0:len(raw_name)] = raw_name
    h[100:108] = _octal(0o644, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(0, 12)
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _pad(n: int) -> int:
    return (-n) % BLOCK


def write_container(members: List[Tuple[str, bytes]]) -> bytes:
    """Canonical container bytes for ``members`` in the given order (callers fix the order)."""
    out = bytearray()
    for name, data in members:
        out += _header(name, len(data))
        out += data
        out += b"\0" * _pad(len(data))
    out += b"\0" * (2 * BLOCK)
    return bytes(out)


_TYPE_NAMES = {
    b"1": "hard link", b"2": "symbolic link", b"3": "character device", b"4": "block device",
    b"5": "directory", b"6": "FIFO", b"7": "contiguous file", b"x": "pax extended header",
    b"g": "pax global header", b"L": "GNU long name", b"K": "GNU long link name",
}


def _parse_octal(field: bytes, what: str) -> int:
    s = field.rstrip(b"\0 ").lstrip(b" ")
    if not s or any(c not in b"01234567" for c in s):
        raise refuse("bad_container", f"member header {what} field is not octal")
    return int(s, 8)


def _check_name(name_field: bytes, prefix_field: bytes) -> str:
    raw = name_field.split(b"\0", 1)[0]
    prefix = prefix_field.split(b"\0", 1)[0]
    if prefix:
        raw = prefix + b"/" + raw
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise refuse("bad_container", f"member name {raw!r} is not ASCII") from None
    if name.startswith("/"):
        raise refuse("bad_container", f"member {name!r} has an absolute path")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise refuse("bad_container", f"member {name!r} has a path traversal ('..')")
    if len(parts) > 1:
        raise refuse("bad_container", f"member {name!r} is inside a directory; bundles are flat")
    if not _full(_NAME_RE, name):
        raise refuse("bad_container", f"member name {name!r} is not a plain file name")
    return name


def parse_container(data: Any, max_file_bytes: int = MAX_FILE_BYTES) -> List[Tuple[str, memoryview]]:
    """Members (name, content view) of a canonical bundle container, read in memory without copying
    the contents; refuses anything else. ``data`` is bytes, bytearray or a memoryview."""
    data = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    if len(data) < BLOCK:
        if len(data) >= 263 and bytes(data[257:263]) != b"ustar\0":
            raise refuse("not_a_bundle", "not a Kestrel bundle (no tar header)")
        raise refuse("truncated", f"only {len(data)} bytes: the download was cut short")
    if bytes(data[257:263]) != b"ustar\0" and any(bytes(data[:BLOCK])):
        raise refuse("not_a_bundle", "not a Kestrel bundle (no ustar tar header)")
    members: List[Tuple[str, memoryview]] = []
    seen = set()
    pos = 0
    n = len(data)
    while True:
        if pos + BLOCK > n:
            raise refuse("truncated", f"archive ends inside a member header at byte {n}")
        hdr = bytes(data[pos:pos + BLOCK])
        if not any(hdr):
            if pos + 2 * BLOCK > n:
                raise refuse("truncated", "archive ends inside the end-of-archive marker")
            if any(bytes(data[pos + BLOCK:pos + 2 * BLOCK])):
                raise refuse("bad_container", "a single zero block inside the archive")
            if pos + 2 * BLOCK != n:
                raise refuse("bad_container", f"{n - pos - 2 * BLOCK} bytes after the end of the archive")
            break
        if len(members) >= MAX_MEMBERS:
            raise refuse("bad_container", f"more than {MAX_MEMBERS} members")
        stored_sum = _parse_octal(hdr[148:156], "checksum")
        computed = sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
        if stored_sum != computed:
            raise refuse("bad_container", f"member header at byte {pos} has a bad checksum")
        if hdr[257:263] != b"ustar\0" or hdr[263:265] != b"00":
            raise refuse("bad_container", f"member header at byte {pos} is not POSIX ustar")
        typeflag = hdr[156:157]
        if typeflag not in (b"0", b"\0"):
            kind = _TYPE_NAMES.get(typeflag, f"type {typeflag!r}")
            raw_name = hdr[:100].split(b"\0", 1)[0]
            raise refuse("bad_container", f"member {raw_name!r} is a {kind}, not a regular file")
        name = _check_name(hdr[0:100], hdr[345:500])
        if name in seen:
            raise refuse("bad_container", f"duplicate member name {name!r}")
        seen.add(name)
        size = _parse_octal(hdr[124:136], "size")
        if size > max_file_bytes:
            raise refuse("too_large", f"member {name!r} is {size} bytes (limit {max_file_bytes})")
        start = pos + BLOCK
        end = start + size
        if end + _pad(size) > n:
            raise refuse("truncated", f"archive ends inside member {name!r}")
        # Canonical form: exactly the header and zero padding build_bundle writes, so no two
        # different byte strings carry the same members (and no ignored field hides data).
        try:
            canonical = _header(name, size)
        except ValueError:
            raise refuse("bad_container", f"member {name!r} has an out-of-range size") from None
        if hdr != canonical or any(bytes(data[end:end + _pad(size)])):
            raise refuse("bad_container", f"member {name!r} is not in canonical form "
                                          "(header or padding altered)")
        members.append((name, data[start:end]))
        pos = end + _pad(size)
    return members
