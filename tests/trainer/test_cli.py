"""kestrel-train bad input: one clear line, non-zero exit, before any long work."""

from __future__ import annotations

import os

import pytest

from tests.trainer.imgs import class_folders
from trainer.cli import main


def _run(capsys, *argv):  # noqa: ANN001, ANN002, ANN202
    rc = main([*argv, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    rc, err = _run(capsys, "run", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"))
    assert rc == 2 and len(err) == 1 and "no images found" in err[0] and err[0].startswith("kestrel-train run: error:")
    assert not (tmp_path / "r").exists()


def test_single_class(tmp_path, capsys):
    class_folders(tmp_path / "data", {"only": 4})
    rc, err = _run(capsys, "run", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"))
    assert rc == 2 and "only one class" in err[-1]


def test_corrupt_files_only_in_one_class(tmp_path, capsys):
    class_folders(tmp_path / "data", {"a": 6})
    (tmp_path / "data" / "b").mkdir()
    for i in range(3):
        (tmp_path / "data" / "b" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff garbage")
    rc, err = _run(capsys, "ingest", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"))
    assert rc == 2 and "only 1 class(es) with usable images" in err[-1]


def test_loose_key_permissions_refused_before_work(tmp_path, capsys):
    from edge.keys import generate_keypair

    key, _ = generate_keypair(tmp_path / "keys")
    os.chmod(key, 0o644)
    class_folders(tmp_path / "data", {"a": 6, "b": 6})
    rc, err = _run(capsys, "run", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"), "--key", str(key))
    assert rc == 2 and "chmod 600" in err[-1]
    assert not (tmp_path / "r").exists()          # nothing ran


def test_wrong_weights_refused_before_work(tmp_path, capsys):
    (tmp_path / "w.h5").write_bytes(b"not an hdf5 file")
    class_folders(tmp_path / "data", {"a": 6, "b": 6})
    rc, err = _run(capsys, "run", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"),
                   "--arch", "mobilenet_v2", "--weights", str(tmp_path / "w.h5"))
    assert rc == 2 and "does not fit mobilenet_v2" in err[-1]
    assert not (tmp_path / "r").exists()


def test_unknown_config_key(tmp_path, capsys):
    (tmp_path / "t.toml").write_text("[model]\nsize = 3\n")
    class_folders(tmp_path / "data", {"a": 6, "b": 6})
    rc, err = _run(capsys, "ingest", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"),
                   "--config", str(tmp_path / "t.toml"))
    assert rc == 2 and "unknown key 'model.size'" in err[-1]


def test_stage_on_missing_run_dir(tmp_path, capsys):
    rc, err = _run(capsys, "train", str(tmp_path / "nope"))
    assert rc == 2 and "does not exist" in err[-1]
    (tmp_path / "half").mkdir()
    rc, err = _run(capsys, "evaluate", str(tmp_path / "half"))
    assert rc == 2 and "kestrel-train ingest" in err[-1]


def test_push_to_unreachable_hub_exits_3(tmp_path, capsys):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                     # nothing listens there now
    (tmp_path / "b.kbundle").write_bytes(b"x" * 100)
    rc, err = _run(capsys, "push", str(tmp_path / "b.kbundle"), "--hub", f"127.0.0.1:{port}")
    assert rc == 3 and len(err) == 1 and "PushModel at hub" in err[0] and "UNAVAILABLE" in err[0]


def test_push_model_without_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err = _run(capsys, "push-model", "--hub", "127.0.0.1:1")
    assert rc == 2 and "no evaluated run under ./runs" in err[-1]


def test_config_doc(capsys):
    assert main(["config-doc"]) == 0
    out = capsys.readouterr().out
    assert "`optimize.sparsity`" in out and "`gate.max_accuracy_drop`" in out


@pytest.mark.parametrize("argv", [["package", "x"], ["keygen"]])
def test_argparse_errors_exit_nonzero(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
