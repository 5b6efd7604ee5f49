"""``kestrel-edge verify`` through the real CLI dispatcher. Python 3.8 compatible."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, List

import pytest

from edge import cli
from tests.helpers.bundles import KeyPair, make_keypair, write_bundle

REPO = Path(__file__).resolve().parents[2]


def run_cli(argv: List[str], capsys: Any) -> Any:
    code = cli.main(["verify"] + argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def kp(tmp_path: Path) -> KeyPair:
    return make_keypair(tmp_path)


@pytest.fixture
def bundle(tmp_path: Path, kp: KeyPair, models_dir: Path) -> Path:
    model = models_dir / "brightness_int8.tflite"
    return write_bundle(tmp_path / "brightness-v4.kbundle", model, kp, version=4)


def test_good_bundle_with_trust_file(bundle: Path, kp: KeyPair, capsys: Any) -> None:
    code, out, err = run_cli([str(bundle), "--trust", str(kp.pub_path)], capsys)
    assert code == 0, err
    assert "bundle OK: brightness v4" in out and kp.key_id in out and "expires" in out


def test_good_bundle_with_trust_dir_from_config(
    tmp_path: Path, bundle: Path, kp: KeyPair, capsys: Any
) -> None:
    trust = tmp_path / "data" / "trust"
    trust.mkdir(parents=True)
    (trust / "release.pub").write_bytes(kp.pub_path.read_bytes())
    cfg = tmp_path / "edge.toml"
    cfg.write_text(f'[device]\ndata_dir = "{tmp_path / "data"}"\n')
    code, out, err = run_cli([str(bundle), "--config", str(cfg), "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["ok"] is True and doc["version"] == 4 and doc["key_id"] == kp.key_id
    assert doc["files"]["labels.txt"]["length"] == len(b"bright\ndark\nmid\n")


def test_trust_dir_option(tmp_path: Path, bundle: Path, kp: KeyPair, capsys: Any) -> None:
    code, out, err = run_cli([str(bundle), "--trust", str(kp.pub_path.parent)], capsys)
    assert code == 0, err


def test_tampered_bundle_exits_2_with_the_reason(
    tmp_path: Path, bundle: Path, kp: KeyPair, capsys: Any
) -> None:
    data = bytearray(bundle.read_bytes())
    data[-1024 - 600] ^= 0xFF  # inside the last payload file (model.tflite), before the end marker
    bad = tmp_path / "bad.kbundle"
    bad.write_bytes(bytes(data))
    code, out, err = run_cli([str(bad), "--trust", str(kp.pub_path)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "bundle refused: hash_mismatch: 'model.tflite'" in lines[0]


def test_json_refusal_and_installed_version(bundle: Path, kp: KeyPair, capsys: Any) -> None:
    code, out, err = run_cli([str(bundle), "--trust", str(kp.pub_path), "--json", "--installed-version", "4"],
                             capsys)
    assert code == 2
    assert json.loads(out)["reason"] == "same_version"
    assert "bundle refused: same_version" in err


def test_untrusted_and_unreadable(tmp_path: Path, bundle: Path, capsys: Any) -> None:
    other = make_keypair(tmp_path, "other")
    code, _, err = run_cli([str(bundle), "--trust", str(other.pub_path)], capsys)
    assert code == 2 and "bundle refused: untrusted_key" in err
    code, _, err = run_cli([str(tmp_path / "missing.kbundle"), "--trust", str(other.pub_path)], capsys)
    assert code == 2 and "missing.kbundle does not exist" in err
    code, _, err = run_cli([str(bundle), "--trust", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "does not exist" in err


def test_oversize_file_refused_before_reading(tmp_path: Path, bundle: Path, kp: KeyPair, capsys: Any) -> None:
    cfg = tmp_path / "small.toml"
    cfg.write_text("[update]\nmax_bundle_bytes = 1024\n")
    code, _, err = run_cli([str(bundle), "--trust", str(kp.pub_path), "--config", str(cfg)], capsys)
    assert code == 2 and "bundle refused: too_large" in err


def test_as_a_real_process(bundle: Path, kp: KeyPair) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "edge", "verify", str(bundle), "--trust", str(kp.pub_path)],
                          cwd=str(REPO), env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"bundle OK: brightness v4" in proc.stdout


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kestrel-edge verify: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_missing_bundle_is_reported_first(tmp_path: Path, capsys: Any) -> None:
    missing = tmp_path / "nope.kbundle"
    # no --trust and no trust dir either: the missing bundle is what gets reported
    code, out, err = run_cli([str(missing)], capsys)
    line = _one_error_line(err)
    assert code == 2 and f"{missing} does not exist" in line and "trust" not in line
    code, out, err = run_cli([str(missing), "--json"], capsys)
    assert code == 2 and json.loads(out) == {"ok": False, "reason": "not_a_bundle",
                                             "error": f"bundle refused: not_a_bundle: {missing} does not exist"}


def test_every_error_path_is_one_clear_line(tmp_path: Path, bundle: Path, kp: KeyPair, capsys: Any) -> None:
    no_pub = tmp_path / "empty-trust"
    no_pub.mkdir()
    bad_pub = tmp_path / "bad.pub"
    bad_pub.write_text("not a key\n")
    empty = tmp_path / "empty.kbundle"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.kbundle"
    garbage.write_bytes(bytes(range(256)) * 8)
    cfg_no_trust = tmp_path / "edge.toml"
    cfg_no_trust.write_text(f'[device]\ndata_dir = "{tmp_path / "data"}"\n')
    bad_cfg = tmp_path / "bad.toml"
    bad_cfg.write_text("[update]\nmax_bundle_bytez = 1\n")
    trust = ["--trust", str(kp.pub_path)]
    cases = [
        ([str(tmp_path)] + trust, "is a directory"),
        ([str(bundle), "--config", str(tmp_path / "missing.toml")], "missing.toml"),
        ([str(bundle), "--config", str(bad_cfg)], "max_bundle_bytez"),
        ([str(bundle), "--config", str(cfg_no_trust)], "pass --trust"),
        ([str(bundle), "--trust", str(no_pub)], "holds no *.pub file"),
        ([str(bundle), "--trust", str(bad_pub)], str(bad_pub)),
        ([str(empty)] + trust, "bundle refused: "),
        ([str(garbage)] + trust, "bundle refused: "),
    ]
    for argv, expected in cases:
        code, out, err = run_cli(argv, capsys)
        line = _one_error_line(err)
        assert code == 2 and expected in line, (argv, line)
        assert out == "", (argv, out)
