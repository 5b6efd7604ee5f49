"""The hub's errors: all defined in hub/errors.py, each under one of the two roots (proto.errors)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path
from typing import List, Type

import hub
from hub import errors
from proto.errors import EXIT_ARTIFACT, ArtifactError, TransportError, run_command

REPO = Path(__file__).resolve().parents[2]


def _hub_exceptions() -> List[Type[BaseException]]:
    """Every exception class defined in any hub module (imported: what really exists at run time)."""
    found = {}
    for info in pkgutil.walk_packages(hub.__path__, "hub."):
        if info.name.endswith("__main__"):  # runs the command line
            continue
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("hub"):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return list(found.values())


def test_hub_errors_names_every_hub_error_in_its_docstring() -> None:
    """tests/test_error_tree.py checks the tree from the source; this checks what hub/errors.py says."""
    excs = _hub_exceptions()
    assert len(excs) >= 12  # the walk did find them
    assert all(e.__module__ == "hub.errors" and issubclass(e, (ArtifactError, TransportError)) for e in excs)
    documented = errors.__doc__ or ""
    missing = sorted(e.__qualname__ for e in excs if e.__qualname__ not in documented)
    assert missing == [], f"hub/errors.py's docstring does not name: {missing}"


def test_the_old_import_names_still_work() -> None:
    from hub.export import ExportError
    from hub.fleet import FleetRequestError, NothingToRollBack
    from hub.ingest.imagecheck import ImageRejected
    from hub.labels import LabelError
    from hub.registry import PRECONDITION, BundleBytesMissing, PushRefused
    assert (ExportError, FleetRequestError, NothingToRollBack, ImageRejected, LabelError, PushRefused,
            BundleBytesMissing) == (errors.ExportError, errors.FleetRequestError, errors.NothingToRollBack,
                                    errors.ImageRejected, errors.LabelError, errors.PushRefused,
                                    errors.BundleBytesMissing)
    assert NothingToRollBack.kind == PRECONDITION == "failed_precondition"


def test_a_rejected_image_is_bad_input_for_a_command() -> None:
    """ImageRejected is an ArtifactError now (it was a ValueError outside the tree): exit 2, one line."""
    from hub.ingest.imagecheck import check_image

    def body() -> int:
        check_image(b"\xff\xd8 not really a jpeg", "jpeg")
        return 0
    assert run_command("check", body) == EXIT_ARTIFACT


def test_errors_imports_nothing_heavy() -> None:
    """hub.errors stays a leaf: importing it loads no other hub module (every hub module imports it)."""
    code = "import sys, hub.errors; print(sorted(m for m in sys.modules if m.startswith('hub.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "['hub.errors']"
