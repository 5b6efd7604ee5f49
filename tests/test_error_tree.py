"""Every error Kestrel raises is in the two-rooted tree (proto.errors: ArtifactError = bad input, exit 2;
TransportError = something unavailable, exit 3) and is defined in its package's errors module.

Read from the source, so it needs none of the packages' dependencies (runs on the device Python too).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("proto", "edge", "hub", "trainer", "jetson")
ROOTS = {"ArtifactError", "TransportError"}
SIGNALS = {"EndOfStream"}  # control flow, documented as not errors in edge/errors.py; never leave edge/
BUILTIN_EXC = {"Exception", "BaseException", "ValueError", "RuntimeError", "OSError", "KeyError", "TypeError",
               "LookupError", "IOError"}


def exception_classes() -> Dict[str, Tuple[str, List[str]]]:
    """class name -> (module path, base names) for every class of ours that derives from an exception."""
    classes: Dict[str, Tuple[str, List[str]]] = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            if path.name.endswith("_pb2.py") or path.name.endswith("_pb2_grpc.py"):
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ClassDef):
                    bases = [b.id if isinstance(b, ast.Name) else b.attr if isinstance(b, ast.Attribute) else ""
                             for b in node.bases]
                    classes[node.name] = (str(path.relative_to(REPO)), bases)
    known: Set[str] = set(BUILTIN_EXC) | {"KestrelError"}
    changed = True
    while changed:
        changed = False
        for name, (_p, bases) in classes.items():
            if name not in known and any(b in known for b in bases):
                known.add(name)
                changed = True
    return {n: v for n, v in classes.items() if n in known and n not in BUILTIN_EXC}


def roots_of(name: str, classes: Dict[str, Tuple[str, List[str]]]) -> Set[str]:
    if name in ROOTS:
        return {name}
    out: Set[str] = set()
    for base in classes.get(name, ("", []))[1]:
        out |= roots_of(base, classes)
    return out


def test_every_error_has_exactly_one_root() -> None:
    classes = exception_classes()
    bad = [f"{path}: {name} has roots {sorted(roots_of(name, classes)) or 'none'}"
           for name, (path, _b) in classes.items()
           if name not in ROOTS | {"KestrelError"} | SIGNALS and len(roots_of(name, classes)) != 1]
    assert bad == [], "errors outside the two-rooted tree:\n" + "\n".join(bad)


def test_errors_live_in_their_packages_errors_module() -> None:
    classes = exception_classes()
    bad = [f"{path}: {name}" for name, (path, _b) in classes.items()
           if Path(path).name != "errors.py" or Path(path).parent.name not in PACKAGES]
    assert bad == [], "error classes outside an errors module:\n" + "\n".join(bad)
    assert {"BundleError", "HubRefused", "KeyFileError", "ConfigError"} <= {
        n for n, (p, _b) in classes.items() if p == "proto/errors.py"}
    assert {"SourceError", "SlotError", "NothingToDo", "FetchError"} <= {
        n for n, (p, _b) in classes.items() if p == "edge/errors.py"}


def test_the_check_sees_a_stray_error() -> None:
    """The walk would notice: a class on a builtin exception is found and has no root."""
    fake = {"Stray": ("hub/x.py", ["ValueError"]), "Good": ("hub/errors.py", ["ArtifactError"])}
    assert roots_of("Stray", fake) == set() and roots_of("Good", fake) == {"ArtifactError"}
