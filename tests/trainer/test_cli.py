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
    from proto.keys import generate_keypair

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
                   "--arch", "mobilenet_v2", "--weights", str(tmp_path / "w.h5"), "--normalization=-1_1")
    assert rc == 2 and "does not fit mobilenet_v2" in err[-1]
    assert not (tmp_path / "r").exists()
    # ImageNet weights with 0..1 inputs would quietly cost accuracy: refused, with the fix.
    rc, err = _run(capsys, "run", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"),
                   "--arch", "mobilenet_v2", "--weights", str(tmp_path / "w.h5"))
    assert rc == 2 and "--normalization=-1_1" in err[-1]


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
    assert rc == 3 and len(err) == 1 and "PushModel" in err[0] and f"127.0.0.1:{port}" in err[0], err
    assert "unreachable" in err[0] or "UNAVAILABLE" in err[0], err


def test_push_model_without_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, err = _run(capsys, "push-model", "--hub", "127.0.0.1:1")
    assert rc == 2 and "no evaluated run under ./runs" in err[-1]


def test_push_model_version_0_is_refused_not_taken_as_unset(tmp_path, capsys, trained_run):
    """VERSION=0 is a bad version (refused before the hub is asked), not "the hub's latest + 1"."""
    from proto.keys import generate_keypair

    key, _ = generate_keypair(tmp_path / "keys")
    rc, err = _run(capsys, "push-model", "--run", str(trained_run), "--key", str(key), "--version", "0",
                   "--hub", "127.0.0.1:1")
    assert rc == 2 and len(err) == 1 and "version must be an integer >= 1" in err[0], err
    assert not (trained_run / "model-v0.kbundle").exists()


def test_config_doc(capsys):
    assert main(["config-doc"]) == 0
    out = capsys.readouterr().out
    assert "`optimize.sparsity`" in out and "`gate.max_accuracy_drop`" in out


@pytest.mark.parametrize("argv", [["package", "x"], ["keygen"]])
def test_argparse_errors_exit_nonzero(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


@pytest.mark.parametrize("flags, message", [
    (["--version", "0", "--key", "KEY"], "--version must be >= 1"),
    (["--model-name", "my model"], "model_name 'my model' must be"),
    (["--test-fraction", "0.9"], "test_fraction must be between"),
    (["--learning-rate", "0"], "learning_rate must be > 0"),
    (["--alpha", "0", "--arch", "mobilenet_v2"], "alpha must be > 0"),
    (["--width", "0"], "width must be 1..512"),
    (["--prune-epochs", "0"], "prune_epochs and qat_epochs must be >= 1"),
    (["--cv-epochs", "-1"], "cv_epochs and head_epochs must be >= 0"),
    (["--max-accuracy-drop", "-5"], "max_accuracy_drop must be 0..100"),
    (["--latency-budget-ms", "-1"], "latency_budget_ms must be 0..3600000"),
    (["--qat", "--arch", "mobilenet_v3_large"], "optimize.qat does not support mobilenet_v3_large"),
    (["--weights", "w.h5", "--normalization=-1_1"], "weights is only for the MobileNet architectures"),
])
def test_bad_settings_are_refused_before_any_work(tmp_path, capsys, monkeypatch, flags, message):
    from proto.keys import generate_keypair
    from trainer import pipeline

    key, _ = generate_keypair(tmp_path / "keys")
    flags = [str(key) if f == "KEY" else f for f in flags]
    class_folders(tmp_path / "data", {"a": 6, "b": 6})
    monkeypatch.setattr(pipeline, "ingest", lambda *a, **k: pytest.fail("ingest ran"))  # noqa: ARG005
    rc, err = _run(capsys, "run", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"), *flags)
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("setting, message", [
    ("[gate]\ndefault_threshold = 1.5", "default_threshold must be 0..1"),
    ("[gate]\nself_test_tolerance = 2.0", "self_test_tolerance must be > 0 and <= 1"),
    ("[gate]\nexpires_in_days = -1.0", "expires_in_days must be > 0"),
    ("[gate]\nself_test_cases = 0", "self_test_cases must be 1..64"),
    ("[train]\ncrop = 1.0", "crop must be 0..0.5"),
])
def test_bad_config_file_values_are_refused(tmp_path, capsys, setting, message):
    (tmp_path / "t.toml").write_text(setting + "\n")
    class_folders(tmp_path / "data", {"a": 6, "b": 6})
    rc, err = _run(capsys, "ingest", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"),
                   "--config", str(tmp_path / "t.toml"))
    assert rc == 2 and len(err) == 1 and message in err[0], err


def test_out_under_a_file_is_refused_before_cleaning(tmp_path, capsys, monkeypatch):
    from trainer import ingest

    (tmp_path / "afile").write_text("x")
    class_folders(tmp_path / "data", {"a": 6, "b": 6})
    monkeypatch.setattr(ingest, "clean", lambda *a, **k: pytest.fail("cleaning ran"))  # noqa: ARG005
    rc, err = _run(capsys, "run", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "afile" / "r"))
    assert rc == 2 and len(err) == 1 and "is a file, not a directory" in err[0]


def test_test_fraction_leaving_too_few_for_the_folds_is_a_data_error(tmp_path, capsys):
    class_folders(tmp_path / "data", {"a": 6, "b": 6})
    rc, err = _run(capsys, "ingest", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"),
                   "--test-fraction", "0.4", "--folds", "5")
    assert rc == 2 and len(err) == 1 and "keeps only 4 distinct image(s) for training" in err[0], err
    assert not (tmp_path / "r").exists()


def test_unexpected_errors_are_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    from trainer import pipeline

    def boom(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("something nobody expected\nsecond line")

    class_folders(tmp_path / "data", {"a": 6, "b": 6})
    monkeypatch.setattr(pipeline, "ingest", boom)
    rc, err = _run(capsys, "ingest", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"))
    assert rc == 1 and len(err) == 1 and "unexpected RuntimeError: something nobody expected" in err[0]
    assert "--debug" in err[0]
    with pytest.raises(RuntimeError):
        main(["ingest", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r"), "--debug"])


def test_unwritable_bundle_path_is_one_line(tmp_path, capsys, trained_run):
    from proto.keys import generate_keypair

    key, _ = generate_keypair(tmp_path / "keys")
    (tmp_path / "afile").write_text("x")
    rc, err = _run(capsys, "package", str(trained_run), "--key", str(key), "--version", "1",
                   "--out", str(tmp_path / "afile" / "b.kbundle"))
    assert rc == 2 and len(err) == 1 and "is a file, not a directory" in err[0]


def test_keygen_refuses_to_overwrite(tmp_path, capsys):
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 0
    assert "signing.key" in capsys.readouterr().out
    assert os.stat(tmp_path / "k" / "signing.key").st_mode & 0o077 == 0
    rc, err = _run(capsys, "keygen", "--out", str(tmp_path / "k"))
    assert rc == 2 and len(err) == 1


def test_help_lists_no_progress_and_verbose(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert ei.value.code == 0
    assert "--no-progress" in out and "--verbose" in out and "--errors-to-catch" in out
    assert "--default-threshold" in out


NOISE = ("absl::InitializeLog", "I0000 ", "E0000 ", "oneDNN", "cuda", "fully_quantize:", "XNNPACK delegate")


@pytest.mark.slow
def test_quiet_by_default_verbose_shows_the_libraries_and_progress_bars_stay(run_copy):
    """TensorFlow's, absl's and LiteRT's native start-up lines (written straight to fd 2, past Python) are off
    by default; --verbose shows them (so they exist and this test would see them); progress bars stay."""
    import subprocess
    import sys

    from tests.trainer.conftest import REPO

    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)

    def kt(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "trainer", *argv], env=env, capture_output=True, text=True,
                              timeout=300)

    quiet = kt("optimize", str(run_copy))              # imports TensorFlow, converts twice, prunes
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert not [n for n in NOISE if n in quiet.stderr], quiet.stderr[-2000:]
    assert "optimize: 100%" in quiet.stderr                             # the progress bar stays
    loud = kt("evaluate", str(run_copy), "--verbose", "--no-progress")  # LiteRT, and the threshold sweep
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "XNNPACK delegate" in loud.stderr                            # LiteRT's own INFO line: shown
    assert "evaluate:" not in loud.stderr and "sampling threshold" in loud.stdout


def test_the_noise_filter_drops_known_library_chatter_and_keeps_the_rest():
    import io

    from trainer.quiet import LineFilter

    out = io.StringIO()
    f = LineFilter(out)
    f.write("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\nI0000 00:00:")
    f.write("1796399016.029445   12531 port.cc:153] oneDNN custom operations are on.\n")
    f.write("E0000 00:00:1796399018.678661   12531 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n")
    f.write("fully_quantize: 0, inference_type: 6, input_inference_type: UINT8, output_inference_type: UINT8\n")
    f.write("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n")
    f.write("E0000 00:00:1796399018.678661   12531 converter.cc:52] something real went wrong\n")
    f.write("F0000 00:00:1.5 1 check.cc:1] Check failed: x\nunknown native line without newline")
    f.close()
    assert out.getvalue().splitlines() == [
        "E0000 00:00:1796399018.678661   12531 converter.cc:52] something real went wrong",
        "F0000 00:00:1.5 1 check.cc:1] Check failed: x", "unknown native line without newline"]
    assert f.dropped == 5
