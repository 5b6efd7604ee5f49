"""The direction of imports, read from the source (every import statement, function-local ones too).

* ``proto`` (the contracts) imports nothing of ours and no OpenCV, TensorFlow or the like;
* ``edge`` imports only itself and the contracts, and never TensorFlow (the device has none);
* ``hub`` and ``trainer`` import the contracts and, from ``edge``, only ``edge.inference`` (what they
  share with the device on purpose: the interpreter wrapper, preprocessing, the perceptual hash);
* inside ``edge`` every import goes down (or sideways within one part) the data path's layers below;
* the whole graph has no cycle, between modules nor between the parts of ``edge``.

Runs in ``make check`` and in ``make test``; pure standard library, so Python 3.8 runs it too.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("proto", "edge", "hub", "trainer", "demo", "jetson")
SHARED_FROM_EDGE = "edge.inference"  # the one module of edge the hub, the trainer and the demo may import
# jetson/ (the image tools on the operator's host) checks a device's edge.toml with the edge's own loader
EDGE_MODULES_FOR = {"jetson": ("edge.config",)}
HEAVY = ("tensorflow", "tf_keras", "keras", "tensorflow_model_optimization", "torch", "jax")
ALLOWED: Dict[str, Tuple[str, ...]] = {  # package -> the top-level packages of ours it may import
    "proto": ("proto",),
    "edge": ("edge", "proto"),
    "hub": ("hub", "proto"),
    "trainer": ("trainer", "proto"),
    "demo": ("demo", "proto", "hub", "trainer"),
    "jetson": ("jetson", "proto"),
}
BANNED_THIRD_PARTY = {"proto": HEAVY + ("cv2",), "edge": HEAVY, "hub": HEAVY, "jetson": HEAVY}
# edge's parts, lowest first: a module may import its own layer or lower ones, never a higher one.
EDGE_LAYERS: List[Tuple[str, ...]] = [
    ("edge", "edge.config", "edge.credentials", "edge.logonce"),
    ("edge.inference", "edge.sources"),
    ("edge.pipeline",),
    ("edge.uplink",),
    ("edge.telemetry", "edge.updater"),
    ("edge.boot", "edge.configcheck"),
    ("edge.daemon",),
    ("edge.cli", "edge.__main__"),
]


def module_files() -> Dict[str, Path]:
    mods: Dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def imports_of(path: Path, name: str, mods: Dict[str, Path]) -> Iterator[Tuple[str, int]]:
    """(imported module, line) for every import in the file, resolved to a module of ours where it
    names one (``from a import b`` -> ``a.b`` when that is a module), else the dotted name given."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full if full in mods else base), node.lineno


def owner(module: str, mods: Dict[str, Path]) -> str:
    """The module of ours an imported name lives in (the longest known prefix), or ''."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in mods:
            return cand
    return ""


def graph() -> Tuple[Dict[str, Path], Dict[str, Set[str]], List[Tuple[str, str, int]]]:
    mods = module_files()
    edges: Dict[str, Set[str]] = {m: set() for m in mods}
    raw: List[Tuple[str, str, int]] = []
    for name, path in mods.items():
        for target, line in imports_of(path, name, mods):
            raw.append((name, target, line))
            own = owner(target, mods)
            if own and own != name:
                edges[name].add(own)
    return mods, edges, raw


def edge_layer(module: str) -> int:
    best, found = -1, 0
    for i, layer in enumerate(EDGE_LAYERS):
        for part in layer:
            if (module == part or module.startswith(part + ".")) and len(part) > best:
                best, found = len(part), i
    assert best >= 0, f"{module} is in no layer of EDGE_LAYERS: add it"
    return found


def edge_part(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []
    counter = [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, ())))))
                    break
                if nxt in on:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_packages_import_only_what_they_may() -> None:
    mods, _edges, raw = graph()
    bad = []
    for src, target, line in raw:
        pkg, top = src.split(".")[0], target.split(".")[0]
        if top in PACKAGES and top != "edge" and top not in ALLOWED[pkg]:
            bad.append(f"{mods[src].relative_to(REPO)}:{line} imports {target}")
        shared = (SHARED_FROM_EDGE,) + EDGE_MODULES_FOR.get(pkg, ())
        if top == "edge" and pkg != "edge" and target not in shared:
            bad.append(f"{mods[src].relative_to(REPO)}:{line} imports {target} (only {SHARED_FROM_EDGE} is shared)")
        if top in BANNED_THIRD_PARTY.get(pkg, ()):
            bad.append(f"{mods[src].relative_to(REPO)}:{line} imports {target}, which {pkg}/ must not")
        if pkg == "proto" and top == "edge":
            bad.append(f"{mods[src].relative_to(REPO)}:{line}: the contracts import the daemon ({target})")
    assert bad == [], "imports against the direction:\n" + "\n".join(bad)


def test_edge_imports_go_down_its_layers() -> None:
    mods, edges, _raw = graph()
    bad = []
    for src, targets in edges.items():
        if not src.startswith("edge"):
            continue
        for t in targets:
            if t.startswith("edge") and edge_layer(t) > edge_layer(src):
                bad.append(f"{mods[src].relative_to(REPO)} (layer {edge_layer(src)}) imports {t} "
                           f"(layer {edge_layer(t)})")
    assert bad == [], "upward imports in edge/:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    _mods, edges, _raw = graph()
    assert cycles(edges) == [], "import cycles between modules"
    parts: Dict[str, Set[str]] = {}
    for src, targets in edges.items():
        if src.startswith("edge."):
            parts.setdefault(edge_part(src), set()).update(
                edge_part(t) for t in targets if t.startswith("edge.") and edge_part(t) != edge_part(src))
    assert cycles(parts) == [], "import cycles between the parts of edge/"


def test_the_checker_sees_what_it_must() -> None:
    """The rules above would fail on a real violation: a fabricated graph with one is caught."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert edge_layer("edge.cli.update") > edge_layer("edge.daemon") > edge_layer("edge.updater.service")
    mods, edges, raw = graph()
    assert "proto.bundle" in mods and "edge.inference" in mods
    # a function-local import is seen: edge.cli loads its commands lazily but imports run_command at the top
    assert any(src == "trainer.evaluate" and t == SHARED_FROM_EDGE for src, t, _ in raw)
