"""The whole pipeline through the CLI: digits -> signed bundle that verifies, passes its self-test on the
edge runtime (here and under Python 3.8 + tflite-runtime 2.14), and is pushed to a real hub registry."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from edge.bundle import verify_bundle
from edge.keys import generate_keypair, load_public_keys
from edge.runtime import load_model
from edge.updater.selftest import run_self_test
from trainer.cli import main

REPO = Path(__file__).resolve().parents[2]
PY38 = REPO / ".venv38" / "bin" / "python"

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
def bundle_run(tmp_path_factory, digits_dir):  # noqa: ANN001, ANN201
    tmp = tmp_path_factory.mktemp("e2e")
    key, pub = generate_keypair(tmp / "keys")
    rundir = tmp / "runs" / "r1"
    out = tmp / "model.kbundle"
    rc = main(["run", "--data", str(digits_dir), "--out", str(rundir), "--folds", "2", "--epochs", "8",
               "--cv-epochs", "2", "--no-flip", "--prune-epochs", "3", "--input-size", "32",
               "--max-accuracy-drop", "100", "--key", str(key), "--version", "2", "--bundle", str(out),
               "--no-progress"])
    # (the gate is exercised in test_stages; a tiny noisy run must not make this test flaky)
    assert rc == 0, "kestrel-train run failed; see the captured stderr"
    return tmp, key, pub, rundir, out


@pytest.mark.slow
def test_bundle_verifies_and_self_test_passes_on_edge_runtime(bundle_run):
    _tmp, _key, pub, rundir, out = bundle_run
    vb = verify_bundle(out.read_bytes(), load_public_keys(pub), installed_version=1, now=time.time())
    m = vb.manifest
    assert m.version == 2 and m.labels == ["0", "1", "2", "3"]
    assert m.input_spec.dtype == "uint8" and m.input_spec.shape == [1, 32, 32, 3]
    assert m.metrics["accuracy"] == json.loads((rundir / "evaluate" / "evaluate.json").read_text())[
        "stages"]["pruned_int8"]["accuracy"]
    assert vb.model_bytes == (rundir / "optimize" / "pruned_int8.tflite").read_bytes()
    assert len(m.self_test.cases) == 4
    model = load_model(vb.model_bytes, spec=m.input_spec, labels=vb.labels)
    res = run_self_test(model, m.self_test, latency_budget_ms=1000.0)
    assert res["cases"] == 4 and res["max_diff"] <= m.self_test.tolerance
    # The cases are real held-out inputs: the model's top class agrees with the expected scores.
    for c in m.self_test.cases:
        x = np.frombuffer(c.input, np.uint8).reshape(m.input_spec.shape)
        assert int(np.argmax(model.invoke(x))) == int(np.argmax(c.expected))


@pytest.mark.slow
def test_bundle_model_runs_on_python38_tflite_runtime(bundle_run, tmp_path):
    if not PY38.exists():
        pytest.skip(f"{PY38} is absent: create the device venv with `make .venv38/.stamp` to test Python 3.8")
    _tmp, _key, _pub, rundir, _out = bundle_run
    ev = json.loads((rundir / "evaluate" / "evaluate.json").read_text())
    (tmp_path / "cases.json").write_text(json.dumps(ev["self_test"]))
    (tmp_path / "check.py").write_text(PY38_SCRIPT)
    proc = subprocess.run([str(PY38), str(tmp_path / "check.py"), str(rundir / "optimize" / "pruned_int8.tflite"),
                           str(tmp_path / "cases.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["version"].startswith("2.14") and res["n"] == 4
    assert res["worst"] <= ev["self_test"]["tolerance"]


@pytest.mark.slow
def test_push_and_push_model_deploy_to_a_real_hub(bundle_run, tmp_path, broker, monkeypatch, capsys):
    hub_registry = pytest.importorskip("hub.registry")
    import paho.mqtt.client as mqtt

    from hub.fleet import FleetService
    from hub.grpc_service import make_server
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
    server, port = make_server(registry, fleet)
    server.start()
    try:
        hub = f"127.0.0.1:{port}"
        assert main(["push", str(out), "--hub", hub, "--no-progress"]) == 0
        assert "pushed kestrel-classifier v2" in capsys.readouterr().out
        assert [r.version for r in registry.list_models("kestrel-classifier")] == [2]
        # push-model: package the newest run under ./runs with the next version, push, deploy to a group.
        monkeypatch.chdir(tmp)
        assert main(["push-model", "--hub", hub, "--key", str(key), "--deploy", "cameras", "--no-progress"]) == 0
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
        rc = main(["push", str(tmp_path / "bad.kbundle"), "--hub", hub, "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "hub refused (INVALID_ARGUMENT)" in err[0], err
        assert sorted(r.version for r in registry.list_models("kestrel-classifier")) == [2, 3]
        # The make target with BUNDLE=: VERSION= must agree with the bundle's manifest ...
        make = ["make", "-s", "--no-print-directory", "-o", "setup", "push-model"]
        proc = subprocess.run(make + [f"BUNDLE={out}", f"HUB={hub}", "VERSION=9"], cwd=str(REPO),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "does not match the bundle" in proc.stderr, proc.stderr[-2000:]
        # ... and pushes and deploys the given bundle as it is.
        v4 = tmp_path / "model-v4.kbundle"
        assert main(["package", str(rundir), "--key", str(key), "--version", "4", "--out", str(v4),
                     "--no-progress"]) == 0
        proc = subprocess.run(make + [f"BUNDLE={v4}", f"HUB={hub}", "VERSION=4", "DEPLOY=device:cam-9"],
                              cwd=str(REPO), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "pushed kestrel-classifier v4" in proc.stdout and "deployed kestrel-classifier v4" in proc.stdout
        assert sorted(r.version for r in registry.list_models("kestrel-classifier")) == [2, 3, 4]
        assert published[-1].endswith("/devices/cam-9/desired")
        # An unreachable hub is a transport error: exit 3.
        assert main(["push", str(v4), "--hub", "127.0.0.1:1", "--no-progress"]) == 3
    finally:
        server.stop(0)
        client.loop_stop()
        client.disconnect()
        store.close()
