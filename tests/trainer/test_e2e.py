"""The whole pipeline through the CLI: digits -> signed bundle that verifies, passes its self-test on the
edge runtime (here and under Python 3.8 with the tflite-runtime a Jetson Nano gets,
jetson/constraints-jp46.txt), and is pushed to a real hub registry."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from edge.inference.runtime import load_model
from edge.updater.selftest import run_self_test
from proto.bundle import verify_bundle
from proto.keys import generate_keypair, load_public_keys
from tests.trainer.conftest import BUNDLE_VERSION, CLASSES, DEVICE_TFLITE_RUNTIME, PY38, REPO, need_py38
from trainer.cli import main

PY38_SCRIPT = r"""
import base64, json, sys
import numpy as np
from tflite_runtime.interpreter import Interpreter
import tflite_runtime
model, cases = sys.argv[1], json.load(open(sys.argv[2]))
it = Interpreter(model_path=model, num_threads=1)
it.allocate_tensors()
inp, out = it.get_input_details()[0], it.get_output_details()[0]
scale, zp = out["quantization"]
worst = 0.0
for c in cases["cases"]:
    x = np.frombuffer(base64.b64decode(c["input"]), dtype=inp["dtype"]).reshape(inp["shape"])
    it.set_tensor(inp["index"], x)
    it.invoke()
    got = (it.get_tensor(out["index"]).reshape(-1).astype(np.float32) - zp) * scale
    worst = max(worst, float(np.abs(got - np.array(c["expected"], np.float32)).max()))
print(json.dumps({"version": tflite_runtime.__version__, "worst": worst, "n": len(cases["cases"])}))
"""


@pytest.fixture(scope="module")
def bundle_run(cli_run):  # noqa: ANN001, ANN201
    """(tmp, key, pub, rundir, bundle) of the shared `kestrel-train run` (tests/trainer/conftest.py)."""
    return cli_run.tmp, cli_run.key, cli_run.pub, cli_run.rundir, cli_run.bundle


def _held_out(rundir: Path):  # noqa: ANN202
    from trainer.ingest import Dataset

    ds = Dataset.load(rundir / "ingest" / "dataset.npz")
    te = np.array(json.loads((rundir / "ingest" / "split.json").read_text())["test"])
    return ds.images[te], ds.labels[te]


@pytest.mark.slow
def test_bundle_verifies_and_its_model_classifies_held_out_images(bundle_run):
    from trainer.preprocess import model_input

    _tmp, _key, pub, rundir, out = bundle_run
    vb = verify_bundle(out.read_bytes(), load_public_keys(pub), installed_version=1, now=time.time())
    m = vb.manifest
    assert m.version == BUNDLE_VERSION and m.labels == [str(c) for c in range(CLASSES)]
    assert m.input_spec.dtype == "uint8" and m.input_spec.shape == [1, 32, 32, 3]
    assert vb.model_bytes == (rundir / "optimize" / "pruned_int8.tflite").read_bytes()
    # The bundle's own model, fed by the edge preprocessing, on held-out images with their TRUE labels.
    images, labels = _held_out(rundir)
    model = load_model(vb.model_bytes, spec=m.input_spec, labels=vb.labels)
    pred = np.array([int(np.argmax(model.invoke(model_input(p, m.input_spec)))) for p in images])
    accuracy = float((pred == labels).mean())
    assert accuracy >= 0.8, f"the shipped model gets only {accuracy:.3f} on held-out digits (chance: 0.25)"
    assert m.metrics["accuracy"] == pytest.approx(accuracy)          # the manifest tells the truth
    assert m.metrics["n_test"] == len(labels)
    assert m.metrics["accuracy_drop_points"] <= 10.0                 # the gate (tolerance 10 here) passed
    # the figures the hub dashboard's Models page shows beside them
    evaluation = json.loads((rundir / "evaluate" / "evaluate.json").read_text())
    optimized = json.loads((rundir / "optimize" / "optimize.json").read_text())
    assert m.metrics["latency_ms"] == evaluation["stages"]["pruned_int8"]["latency"]["median_ms"] > 0
    assert m.metrics["sparsity"] == optimized["sparsity"]["overall"] and 0 < m.metrics["sparsity"] < 1
    assert m.metrics["float_accuracy"] == evaluation["stages"]["float"]["accuracy"]


@pytest.mark.slow
def test_signed_manifest_carries_the_threshold_chosen_from_the_data_and_the_confusion_matrix(bundle_run):
    """The default threshold in the signed manifest is the sweep's choice (nothing configured), the one the
    report shows; the manifest's metrics hold the confusion matrix with its class names for the dashboard."""
    _tmp, _key, pub, rundir, out = bundle_run
    m = verify_bundle(out.read_bytes(), load_public_keys(pub), installed_version=1, now=time.time()).manifest
    ev = json.loads((rundir / "evaluate" / "evaluate.json").read_text())
    sweep = ev["threshold"]
    figs = json.loads((rundir / "report" / "figures.json").read_text())
    assert json.loads((rundir / "config.json").read_text())["gate"]["default_threshold"] is None
    if sweep["n_errors"]:
        assert m.default_threshold == sweep["chosen"] == sweep["rules"]["confidence"]["chosen"]["threshold"]
        assert m.metrics["sampling"]["source"] == "data"
        # the choice really is the fewest frames that catch the share: one step lower catches less
        pts = sweep["rules"]["confidence"]["points"]
        i = next(i for i, p in enumerate(pts) if p["threshold"] == m.default_threshold)
        assert pts[i]["caught"] >= sweep["target"] * sweep["n_errors"] > (pts[i - 1]["caught"] if i else -1)
    else:  # no held-out errors: nothing to choose from, the device default
        assert m.default_threshold == 0.6 and m.metrics["sampling"]["source"] == "device default"
    assert figs["threshold"]["in_bundle"]["threshold"] == m.default_threshold
    assert m.metrics["sampling"]["errors_to_catch"] == 0.8 and m.metrics["sampling"]["n_errors"] == sweep["n_errors"]
    assert m.metrics["class_names"] == m.labels == ev["class_names"]
    assert m.metrics["confusion_matrix"] == ev["stages"]["pruned_int8"]["confusion"]
    assert sum(map(sum, m.metrics["confusion_matrix"])) == m.metrics["n_test"]
    assert 0.0 <= m.metrics["ece"] <= 1.0 and 0.0 <= m.metrics["ece_float"] <= 1.0


@pytest.mark.slow
def test_bundle_self_test_passes_on_edge_runtime_without_a_desktop_latency_budget(bundle_run):
    _tmp, _key, pub, _rundir, out = bundle_run
    vb = verify_bundle(out.read_bytes(), load_public_keys(pub), installed_version=1, now=time.time())
    st = vb.manifest.self_test
    assert len(st.cases) == 4
    # No x86-derived budget in the bundle: the device's own (larger, device-class) budget applies.
    assert st.latency_budget_ms is None
    model = load_model(vb.model_bytes, spec=vb.manifest.input_spec, labels=vb.labels)
    res = run_self_test(model, st, latency_budget_ms=1000.0)
    assert res["cases"] == 4 and res["max_diff"] <= st.tolerance
    # The cases cover every class (one per class first): their expected top classes are 0, 1, 2, 3.
    assert sorted(int(np.argmax(c.expected)) for c in st.cases) == [0, 1, 2, 3]


@pytest.mark.slow
def test_kestrel_edge_verify_accepts_the_trainer_bundle_and_refuses_other_keys(bundle_run, tmp_path, capsys):
    from edge.cli import main as edge_main

    _tmp, _key, pub, _rundir, out = bundle_run
    assert edge_main(["verify", str(out), "--trust", str(pub)]) == 0
    assert "kestrel-classifier" in capsys.readouterr().out
    _other_key, other_pub = generate_keypair(tmp_path / "other")
    assert edge_main(["verify", str(out), "--trust", str(other_pub)]) == 2
    assert "untrusted_key" in capsys.readouterr().err


@pytest.mark.slow
def test_run_shows_progress_bars_and_summaries(cli_run):
    for bar in ("ingest", "cv folds", "train", "optimize", "evaluate"):
        assert f"{bar}:" in cli_run.stderr, bar
    assert "cv (2-fold): accuracy" in cli_run.stdout and f"bundle: {cli_run.bundle}" in cli_run.stdout


@pytest.mark.slow
def test_bundle_model_runs_on_python38_tflite_runtime(bundle_run, tmp_path):
    need_py38()
    _tmp, _key, _pub, rundir, _out = bundle_run
    ev = json.loads((rundir / "evaluate" / "evaluate.json").read_text())
    (tmp_path / "cases.json").write_text(json.dumps(ev["self_test"]))
    (tmp_path / "check.py").write_text(PY38_SCRIPT)
    proc = subprocess.run([str(PY38), str(tmp_path / "check.py"), str(rundir / "optimize" / "pruned_int8.tflite"),
                           str(tmp_path / "cases.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["version"] == DEVICE_TFLITE_RUNTIME and res["n"] == 4
    assert res["worst"] <= ev["self_test"]["tolerance"]


@pytest.mark.slow
def test_push_and_push_model_deploy_to_a_real_hub(bundle_run, tmp_path, broker, monkeypatch, capsys):
    hub_registry = pytest.importorskip("hub.registry")
    import paho.mqtt.client as mqtt

    from hub import auth
    from hub.config import from_dict
    from hub.fleet import FleetService
    from hub.grpc_auth import GrpcAuth
    from hub.grpc_service import make_server
    from hub.security.enrol import Security
    from hub.store.sqlite import SqliteStore

    tmp, key, pub, rundir, out = bundle_run
    (tmp_path / "trust").mkdir()
    (tmp_path / "trust" / "signing.pub").write_bytes(Path(pub).read_bytes())
    store = SqliteStore(tmp_path / "hub.db")
    registry = hub_registry.Registry(store, hub_registry.RegistryConfig(trust_dir=str(tmp_path / "trust")),
                                     tmp_path / "hubdata")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect(broker.host, broker.port)
    client.loop_start()
    published = []

    def publish_retained(topic: str, payload: bytes) -> None:
        info = client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(10)
        published.append(topic)

    fleet = FleetService(store, registry, publish_retained)
    # the hub's gRPC as `kestrel-hub serve` runs it: TLS with its fleet CA's certificate, a token on every call
    security = Security(from_dict({"hub": {"data_dir": str(tmp_path / "hubdata")}}))
    server, port, _ = make_server(registry, fleet, auth=GrpcAuth(lambda t: auth.authenticate(store, t)),
                                  tls=security.grpc_tls())
    server.start()

    def token_file(name: str, role: str) -> str:
        path = tmp_path / f"{name}.token"
        path.write_text(auth.add_token(store, name, role) + "\n")
        path.chmod(0o600)
        return str(path)

    trainer_token, operator_token = token_file("ci", "trainer"), token_file("ops", "operator")
    ca = str(security.ca_file)
    creds = ["--token-file", trainer_token, "--ca-file", ca]
    try:
        hub = f"127.0.0.1:{port}"
        rc = main(["push", str(out), "--hub", hub, "--ca-file", ca, "--no-progress"])  # no token: refused
        assert rc == 2 and "UNAUTHENTICATED" in capsys.readouterr().err
        assert main(["push", str(out), "--hub", hub, *creds, "--no-progress"]) == 0
        assert "pushed kestrel-classifier v2" in capsys.readouterr().out
        assert [r.version for r in registry.list_models("kestrel-classifier")] == [2]
        # push-model: package the newest run under ./runs with the next version, push, deploy to a group.
        monkeypatch.chdir(tmp)
        assert main(["push-model", "--hub", hub, "--key", str(key), "--deploy", "cameras", *creds,
                     "--deploy-token-file", operator_token, "--no-progress"]) == 0
        text = capsys.readouterr().out
        assert "pushed kestrel-classifier v3" in text and "deployed kestrel-classifier v3 to cameras" in text
        assert sorted(r.version for r in registry.list_models("kestrel-classifier")) == [2, 3]
        assert published and "cameras" in published[-1]
        # A tampered bundle is refused by the hub: a clear one-line error, exit 2 (bad input, not
        # "unreachable": pushing it again will not help).
        data = bytearray(out.read_bytes())
        model = (rundir / "optimize" / "pruned_int8.tflite").read_bytes()
        data[data.find(model[:64]) + len(model) // 2] ^= 0xFF       # one bit-flip inside the signed model
        (tmp_path / "bad.kbundle").write_bytes(bytes(data))
        rc = main(["push", str(tmp_path / "bad.kbundle"), "--hub", hub, *creds, "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "hub refused (INVALID_ARGUMENT)" in err[0], err
        assert sorted(r.version for r in registry.list_models("kestrel-classifier")) == [2, 3]
        # The make target with BUNDLE=: VERSION= must agree with the bundle's manifest ...
        make = ["make", "-s", "--no-print-directory", "-o", "setup", "push-model"]
        make_creds = [f"TOKEN_FILE={trainer_token}", f"CA={ca}"]
        proc = subprocess.run(make + [f"BUNDLE={out}", f"HUB={hub}", "VERSION=9", *make_creds], cwd=str(REPO),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "does not match the bundle" in proc.stderr, proc.stderr[-2000:]
        # ... and pushes and deploys the given bundle as it is.
        v4 = tmp_path / "model-v4.kbundle"
        assert main(["package", str(rundir), "--key", str(key), "--version", "4", "--out", str(v4),
                     "--no-progress"]) == 0
        rc = main(["push-model", "--bundle", str(v4), "--hub", hub, "--deploy", "device:cam-9", *creds,
                   "--no-progress"])  # the trainer's token pushes; it may not deploy: one line, exit 2
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "PERMISSION_DENIED" in err[0] and "--deploy-token-file" in err[0], err
        assert published[-1].endswith("/groups/cameras/desired")  # nothing announced
        proc = subprocess.run(make + [f"BUNDLE={v4}", f"HUB={hub}", "VERSION=4", "DEPLOY=device:cam-9", *make_creds,
                                      f"DEPLOY_TOKEN_FILE={operator_token}"],
                              cwd=str(REPO), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "kestrel-classifier v4" in proc.stdout and "deployed kestrel-classifier v4" in proc.stdout
        assert sorted(r.version for r in registry.list_models("kestrel-classifier")) == [2, 3, 4]
        assert published[-1].endswith("/devices/cam-9/desired")
        # An unreachable hub is a transport error: exit 3.
        assert main(["push", str(v4), "--hub", "127.0.0.1:1", "--no-progress"]) == 3
    finally:
        server.stop(0)
        client.loop_stop()
        client.disconnect()
        store.close()
