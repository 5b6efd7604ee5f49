"""edge/ never imports TensorFlow (the device has none): import every edge module in a fresh
interpreter that *has* TensorFlow installed and check that nothing pulled it in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = r"""
import importlib, json, pkgutil, sys
import edge
names = sorted(m.name for m in pkgutil.walk_packages(edge.__path__, "edge.")
               if not m.name.endswith("__main__"))  # __main__ runs the CLI
failed = {}
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:  # a module that cannot even be imported is a failure of its own
        failed[name] = repr(exc)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras", "jax", "torch"))
print(json.dumps({"modules": names, "failed": failed, "heavy": heavy}))
"""


def test_importing_every_edge_module_pulls_in_no_tensorflow() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=str(REPO), env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"edge.daemon", "edge.inference.runtime", "edge.uplink.publisher", "edge.uplink.sink",
            "edge.updater.service"} <= set(res["modules"])
    assert res["failed"] == {}
    assert res["heavy"] == [], f"edge pulled in {res['heavy']}"
