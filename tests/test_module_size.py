"""No module outside tests/ over MAX_LINES lines unless docs/adr/0012-long-modules.md names it with the
one concern it holds (issue 9). Pure standard library: the device suite runs it too."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 450
ADR = REPO / "docs" / "adr" / "0012-long-modules.md"


def long_modules() -> dict:
    out = {}
    for pkg in ("proto", "edge", "hub", "trainer", "demo", "jetson"):
        for path in (REPO / pkg).rglob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            n = len(path.read_text().splitlines())
            if n > MAX_LINES:
                out[str(path.relative_to(REPO))] = n
    return out


def test_long_modules_are_explained() -> None:
    listed = ADR.read_text()
    unexplained = {p: n for p, n in long_modules().items() if f"`{p}`" not in listed}
    assert unexplained == {}, (f"modules over {MAX_LINES} lines not explained in {ADR.relative_to(REPO)}: "
                               f"{unexplained}; split them or add a line saying why each is one concern")


def test_the_count_sees_long_files() -> None:
    assert all(n > MAX_LINES for n in long_modules().values())
    assert "edge/daemon.py" not in long_modules()  # a short module is not reported
