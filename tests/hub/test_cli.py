"""kestrel-hub errors through proto.errors.run_command: an OSError or a bug in a command is one line on stderr
with its exit code (not a traceback), Ctrl-C is EXIT_INTERRUPTED, and --debug / KESTREL_DEBUG=1 show the traceback."""

from __future__ import annotations

import pytest

from hub.cli import label as labelcmd
from hub.cli import main
from proto.errors import DEBUG_ENV, EXIT_ARTIFACT, EXIT_INTERRUPTED, EXIT_OTHER


def _config(tmp_path):  # noqa: ANN001, ANN202
    cfg = tmp_path / "hub.toml"
    cfg.write_text(f'[hub]\ndata_dir = "{tmp_path}"\n[store]\nurl = "sqlite:///{tmp_path / "hub.db"}"\n')
    return str(cfg)


def _err(capsys) -> list:  # noqa: ANN001
    return capsys.readouterr().err.strip().splitlines()


def test_an_os_error_in_a_hub_command_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "export"
    rc = main(["export", "--config", _config(tmp_path), "--out", str(out)])
    err = _err(capsys)
    assert rc == EXIT_ARTIFACT and len(err) == 1, err
    assert err[0].startswith("kestrel-hub export: error: cannot access ") and "afile" in err[0], err
    assert not out.exists()


def test_a_bug_in_a_hub_command_is_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    def boom(_args):  # noqa: ANN001, ANN202
        raise RuntimeError("something nobody expected\nsecond line")

    monkeypatch.setattr(labelcmd, "run", boom)
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    argv = ["label", "--config", _config(tmp_path), "cam-1:boot/1", "bright"]
    assert main(argv) == EXIT_OTHER
    err = _err(capsys)
    assert len(err) == 1 and err[0].startswith("kestrel-hub label: error: unexpected RuntimeError: "
                                               "something nobody expected ("), err
    assert "--debug" in err[0] and DEBUG_ENV in err[0]
    with pytest.raises(RuntimeError, match="nobody expected"):
        main([*argv[:1], "--debug", *argv[1:]])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(RuntimeError, match="nobody expected"):
        main(argv)


def test_ctrl_c_in_a_hub_command_is_interrupted(tmp_path, capsys, monkeypatch):
    def interrupted(_args):  # noqa: ANN001, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(labelcmd, "run", interrupted)
    assert main(["label", "--config", _config(tmp_path), "cam-1:boot/1", "bright"]) == EXIT_INTERRUPTED
    assert _err(capsys) == ["kestrel-hub label: interrupted"]
