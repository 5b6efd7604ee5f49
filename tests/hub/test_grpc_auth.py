"""Authenticated gRPC on the real hub (`python -m hub serve`): TLS with a certificate of the fleet CA, a token
of the right role on every call (hub/grpc_auth.py), the same tokens as the dashboard (hub/auth.py).

A push, deploy or rollback with no token, an unknown or revoked token, or a token of the wrong role is
refused (UNAUTHENTICATED / PERMISSION_DENIED) and changes nothing: not the registry, not a group's desired
state; a device's token fetches and does nothing else; a client that does not trust the fleet CA gets one
line and exit 2; no token ever shows in the hub's log, /metrics, /healthz or hub.json.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Dict, List

import grpc
import pytest
from cryptography import x509

from hub import auth
from hub.store.sqlite import SqliteStore
from proto import kestrel_pb2, kestrel_pb2_grpc
from proto.errors import ConfigError, HubRefused
from proto.hubclient import HubClient
from proto.hubcreds import Credentials
from tests.helpers.broker import free_port
from tests.helpers.bundles import make_bundle, make_keypair
from tests.helpers.tlscerts import make_tls
from tests.hub import REPO, HubProcess, grpc_credentials, write_config

ROLES = ("trainer", "operator", "viewer", "labeller", "device")


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    """`python -m hub ...` with HOME elsewhere (no ~/.config/kestrel of the machine) and no token env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KESTREL_HUB_")}
    env.update(PYTHONPATH=str(REPO), HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
    return subprocess.run([sys.executable, "-m", *args], cwd=str(REPO), capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Any:
    """A real hub (TLS gRPC, a plain-text port on 127.0.0.1 as [grpc] plain_port asks), a token per role, a
    model-signing key it trusts and v1 of a model pushed and deployed to group g1."""
    tmp = tmp_path_factory.mktemp("grpc-auth")
    data = tmp / "hub"
    kp = make_keypair(tmp)
    (data / "trust").mkdir(parents=True)
    shutil.copyfile(kp.pub_path, data / "trust" / kp.pub_path.name)
    plain = free_port()
    cfg = write_config(tmp / "hub.toml", data, grpc=f"plain_port = {plain}")
    proc = HubProcess(cfg, data, tmp / "hub.log").start()
    store = SqliteStore(data / "hub.db")
    tokens = {role: auth.add_token(store, f"t-{role}", role) for role in ROLES}
    revoked = auth.add_token(store, "t-gone", "admin")
    auth.revoke_token(store, "t-gone")
    model = models_dir / "brightness_int8.tflite"
    v1 = make_bundle(model, kp, version=1)
    with proc.grpc_client(tokens["trainer"]) as c:
        c.push(v1)
    with proc.grpc_client(tokens["operator"]) as c:
        c.deploy("brightness", 1, group="g1")
    yield {"proc": proc, "store": store, "tokens": tokens, "revoked": revoked, "kp": kp, "model": model, "v1": v1,
           "plain": plain, "tmp": tmp, "cfg": cfg, "data": data}
    store.close()
    assert proc.stop() == 0


def _state(h: Dict[str, Any]) -> Any:
    """What a refused call must not change: the registry's versions, the bundles the store keeps and pushes being
    received, g1's desired state."""
    store, data = h["store"], h["data"]
    g1 = store.get_group_desired("g1")
    models = [(m.model_name, m.version) for m in store.list_models()]
    kept = sorted(p.name for d in (data / "hub.db-bundles", data / "pushes") if d.is_dir() for p in d.iterdir())
    return (models, kept,
            (g1.model_name, g1.version, g1.rollback) if g1 is not None else None)


def _client(h: Dict[str, Any], token: str) -> HubClient:
    return HubClient(f"127.0.0.1:{h['proc'].info['grpc_port']}", 20, grpc_credentials(h["data"], token or "-"))


def _refused(client: HubClient, what: str, h: Dict[str, Any]) -> str:
    with pytest.raises(HubRefused) as ei:
        if what == "push":
            client.push(make_bundle(h["model"], h["kp"], version=2))
        elif what == "deploy":
            client.deploy("brightness", 1, group="g2")
        else:
            client.rollback(group="g1")
    return ei.value.code


def test_push_deploy_and_rollback_need_a_valid_token_of_the_right_role(hub: Dict[str, Any]) -> None:
    before = _state(hub)
    assert before == ([("brightness", 1)], before[1], ("brightness", 1, False)) and len(before[1]) == 1
    t = hub["tokens"]
    for what in ("push", "deploy", "rollback"):
        no_token = _client(hub, "")
        no_token.metadata = ()  # sends no authorization header at all
        assert _refused(no_token, what, hub) == "UNAUTHENTICATED", what
        assert _refused(_client(hub, "kst_" + "x" * 43), what, hub) == "UNAUTHENTICATED", what
        assert _refused(_client(hub, hub["revoked"]), what, hub) == "UNAUTHENTICATED", what
        bad_header = _client(hub, t["operator"])
        bad_header.metadata = (("authorization", t["operator"]),)  # no "Bearer"
        assert _refused(bad_header, what, hub) == "UNAUTHENTICATED", what
    # the wrong role: the trainer may push only, an operator deploy and roll back only, people's roles neither
    for role, refused in (("trainer", ("deploy", "rollback")), ("operator", ("push",)), ("device", ("push", "deploy",
                          "rollback")), ("viewer", ("push", "deploy", "rollback")), ("labeller", ("push", "deploy"))):
        for what in refused:
            assert _refused(_client(hub, t[role]), what, hub) == "PERMISSION_DENIED", (role, what)
    assert _state(hub) == before  # nothing stored, nothing announced
    with pytest.raises(HubRefused) as ei:
        _client(hub, t["trainer"]).deploy("brightness", 1, group="g2")
    assert "token 't-trainer' (role trainer) may not deploy" in ei.value.detail


def test_a_device_token_fetches_and_does_nothing_else(hub: Dict[str, Any]) -> None:
    bundle = hub["v1"]
    device = _client(hub, hub["tokens"]["device"])
    assert device.fetch("brightness", 1) == bundle
    for call in (lambda: device.list_models(), lambda: device.list_devices(), lambda: device.push(bundle)):
        with pytest.raises(HubRefused) as ei:
            call()
        assert ei.value.code == "PERMISSION_DENIED"
    # the trainer lists models (to pick the next version) but fetches nothing; people's roles list the fleet
    trainer = _client(hub, hub["tokens"]["trainer"])
    assert [v.model.version for v in trainer.list_models()] == [1]
    with pytest.raises(HubRefused) as ei:
        trainer.fetch("brightness", 1)
    assert ei.value.code == "PERMISSION_DENIED"
    assert _client(hub, hub["tokens"]["viewer"]).list_devices() == []


def test_plain_text_only_on_the_loopback_port_the_config_asks_for(hub: Dict[str, Any]) -> None:
    plain = Credentials(token=hub["tokens"]["viewer"], plaintext=True)
    with HubClient(f"127.0.0.1:{hub['plain']}", 10, plain) as c:
        assert [v.model.version for v in c.list_models()] == [1]  # the token is checked there too
    with HubClient(f"127.0.0.1:{hub['plain']}", 10, Credentials(plaintext=True)) as c, \
            pytest.raises(HubRefused) as ei:
        c.list_models()
    assert ei.value.code == "UNAUTHENTICATED"
    # the TLS port speaks no plain text
    with grpc.insecure_channel(f"127.0.0.1:{hub['proc'].info['grpc_port']}") as ch, \
            pytest.raises(grpc.RpcError) as rpc:
        kestrel_pb2_grpc.ModelRegistryStub(ch).ListModels(
            kestrel_pb2.ListModelsRequest(), timeout=10, metadata=(("authorization", f"Bearer {plain.token}"),))
    assert rpc.value.code() == grpc.StatusCode.UNAVAILABLE
    # and a client never sends a token in plain text to another machine
    with pytest.raises(ConfigError, match="plain text"):
        HubClient("10.1.2.3:50051", 1, plain)


def test_clis_tls_errors_and_the_hubs_own_files(hub: Dict[str, Any]) -> None:
    tmp, proc = hub["tmp"], hub["proc"]
    target = f"127.0.0.1:{proc.info['grpc_port']}"
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    token_file = tmp / "operator.token"
    token_file.write_text(hub["tokens"]["operator"] + "\n")
    token_file.chmod(0o600)
    ca = str(proc.info["grpc_ca_file"])
    # a client that trusts another CA: one line, exit 2 (its CA file is wrong: retrying will not help)
    other = make_tls(tmp / "other-ca")
    r = _cli("hub", "models", "--hub", target, "--token-file", str(token_file), "--ca-file", str(other.ca), home=home)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "TLS with hub" in r.stderr and "CERTIFICATE_VERIFY_FAILED" in r.stderr and "--ca-file" in r.stderr
    bundle = tmp / "v5.kbundle"
    bundle.write_bytes(make_bundle(hub["model"], hub["kp"], version=5))
    trainer_token = tmp / "trainer.token"
    trainer_token.write_text(hub["tokens"]["trainer"] + "\n")
    trainer_token.chmod(0o600)
    r = _cli("trainer", "push", str(bundle), "--hub", target, "--token-file", str(trainer_token), "--ca-file",
             str(other.ca), home=home)
    assert r.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # gRPC core's own handshake lines stay quiet
    # no token: the hub's answer and where a token goes
    r = _cli("hub", "deploy", "brightness", "1", "--group", "g3", "--hub", target, "--ca-file", ca, home=home)
    assert r.returncode == 2 and "UNAUTHENTICATED" in r.stderr and "--token-file" in r.stderr, r.stderr
    # the environment and the documented default path
    cfgdir = home / ".config" / "kestrel"
    cfgdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca, cfgdir / "hub-ca.crt")
    shutil.copyfile(token_file, cfgdir / "hub-token")
    (cfgdir / "hub-token").chmod(0o644)
    r = _cli("hub", "models", "--hub", target, home=home)
    assert r.returncode == 2 and "readable by everyone" in r.stderr  # a token file is a secret
    (cfgdir / "hub-token").chmod(0o600)
    r = _cli("hub", "deploy", "brightness", "1", "--group", "g3", "--hub", target, home=home)
    assert r.returncode == 0 and "kestrel/v1/groups/g3/desired" in r.stdout, r.stderr
    # on the hub's machine: its first admin token and its CA, from --config
    shutil.rmtree(cfgdir)
    r = _cli("hub", "rollback", "--group", "g3", "--hub", target, "--config", str(hub["cfg"]), home=home)
    assert r.returncode == 0 and "rollback announced" in r.stdout, r.stderr
    # no token in the log, /metrics, /healthz or hub.json; refusals counted by reason
    base = f"http://127.0.0.1:{proc.info['http_port']}"
    seen: List[str] = [(tmp / "hub.log").read_text(), (hub["data"] / "hub.json").read_text()]
    for path in ("/metrics", "/healthz"):
        with urllib.request.urlopen(base + path, timeout=5) as resp:
            seen.append(resp.read().decode())
    exposed = "\n".join(seen)
    for token in [*hub["tokens"].values(), hub["revoked"]]:
        assert token not in exposed
    assert 'kestrel_hub_grpc_refused_total{reason="unauthenticated"}' in seen[2]
    assert 'kestrel_hub_grpc_refused_total{reason="permission_denied"}' in seen[2]
    assert "gRPC Deploy called by token 't-operator' (role operator)" in seen[0]  # who did it, never the token
    sec = hub["data"] / "security"
    assert (sec / "grpc.key").stat().st_mode & 0o777 == 0o600  # the gRPC server's key: never world-readable
    cert = x509.load_pem_x509_certificate((sec / "grpc.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in names} == {"127.0.0.1", "localhost"}  # the embedded defaults


def test_a_store_of_device_tokens_only_still_gets_an_admin_token(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    try:
        auth.replace_device_token(store, "cam-1")  # `kestrel-hub devices add` before the hub's first start
        made = auth.ensure_admin_token(store, tmp_path)
        assert made is not None and auth.authenticate(store, made.read_text().strip()).role == "admin"
        again = auth.replace_device_token(store, "cam-1")  # a re-enrolled device: the old token goes
        assert [t.name for t in store.list_tokens() if t.active] == ["admin", "device.cam-1"]
        assert auth.authenticate(store, again).role == "device"
    finally:
        store.close()
