"""Deploy and roll back from the dashboard's Models page, in headless Chromium, against real parts: a
``kestrel-hub serve`` process (embedded Mosquitto, SQLite), signed bundles of the real brightness
models pushed over gRPC, and a real ``kestrel-edge run`` daemon that fetches, verifies, self-tests and
switches. Each click (after its confirmation) must change the retained desired state on the broker,
and the device must move to that version. The dashboard's orders are signed by the hub's fleet key like
the CLI's (the device refuses anything else), and read here with the hub's own identity (the embedded
broker speaks TLS with client certificates and the per-device ACL)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
from playwright.sync_api import expect

from demo.loop import GROUP
from edge.config import UpdateConfig
from edge.updater.desiredgate import load_fleet_keys
from proto import desired as signing
from proto import kestrel_pb2, topics
from proto.clock import now_ms
from tests.e2e.loop import MODEL_NAME, BrightnessLoop
from tests.helpers.mqtt import Collector
from tests.hub import hub_identity
from tests.hub.dashboard import BROWSER_TIMEOUT_MS, browser, login, new_page, screenshot

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def loop(tmp_path: Path, models_dir: Path) -> Iterator[BrightnessLoop]:
    lp = BrightnessLoop(tmp_path / "loop", models_dir)
    try:
        yield lp
    finally:
        lp.close()


def retained_desired(loop: BrightnessLoop) -> kestrel_pb2.DesiredState:
    """What a device subscribing now gets: the retained desired state of the group, from the broker itself."""
    topic = topics.group_desired(GROUP)
    c = Collector(loop.hub_info["mqtt_host"], int(loop.hub_info["mqtt_port"]), [topic], **hub_identity(loop.hub_dir))
    try:
        payload = c.wait_count(1, "/desired")[0]
        assert c.messages[0][2] is True  # delivered as the retained message
    finally:
        c.close()
    msg = kestrel_pb2.DesiredState.FromString(payload)
    keys = load_fleet_keys(UpdateConfig(fleet_keys=[str(loop.hub_dir / "security" / "fleet.pub")]))
    signing.verify(topic, msg, keys, now_ms=now_ms())  # signed by the hub's fleet key, not expired
    return msg


def confirm(page: Any, kind: str, target: str) -> None:
    """In the confirmation dialog: choose a group or a device and confirm."""
    dialog = page.locator("dialog#confirm")
    expect(dialog).to_be_visible()
    dialog.locator(f'input[name="kind"][value="{kind}"]').check()
    dialog.locator(f"#target-{kind}").select_option(target)
    assert target in dialog.locator("#confirm-text").inner_text()
    dialog.locator("#confirm-ok").click()


def test_deploy_and_rollback_from_the_models_page_move_a_real_device(loop: BrightnessLoop) -> None:
    loop.make_keys()
    loop.start_hub()
    loop.push(loop.bundle(1))
    loop.push(loop.bundle(2))
    loop.deploy(MODEL_NAME, 1)
    loop.start_brightness_edge()
    loop.wait_device(1, "COMMITTED", timeout=90)
    token = (loop.hub_dir / "admin-token").read_text().strip()
    base = loop.http_base
    with browser() as b:
        ctx, page, errors = new_page(b, 1400, 1000)
        login(page, base, token, "/models")
        version2 = page.locator("#v-brightness-2")
        expect(page.locator("#v-brightness-1")).to_contain_text(loop.device_id)  # v1 runs on the device
        version2.locator("button.deploy").click()
        page.locator("#confirm-title").wait_for()
        assert "Deploy brightness v2" in page.inner_text("#confirm-title")
        page.locator("dialog#confirm button[value=cancel]").click()  # cancelled: nothing happens
        assert retained_desired(loop).version == 1
        version2.locator("button.deploy").click()
        confirm(page, "group", GROUP)
        expect(page.locator("#toast")).to_contain_text("deployed", timeout=BROWSER_TIMEOUT_MS)
        desired = retained_desired(loop)
        assert (desired.model_name, desired.version, desired.rollback) == (MODEL_NAME, 2, False)
        dev = loop.wait_device(2, "COMMITTED", timeout=90)
        assert dev.versions.previous.version == 1
        page.goto(f"{base}/models", wait_until="networkidle")
        expect(page.locator("#v-brightness-2")).to_contain_text(loop.device_id)
        screenshot(page, "models-after-deploy")
        page.locator("button.rollback").click()
        confirm(page, "group", GROUP)
        expect(page.locator("#toast")).to_contain_text("rollback announced", timeout=BROWSER_TIMEOUT_MS)
        desired = retained_desired(loop)
        assert desired.rollback is True and desired.rollback_from_version == 2
        dev = loop.wait_device(1, "ROLLED_BACK", timeout=90)
        assert "rollback" in dev.versions.reason
        page.goto(f"{base}/fleet", wait_until="networkidle")
        row = page.locator(f'tr[data-device="{loop.device_id}"]')
        expect(row).to_contain_text("brightness v1")
        expect(row).to_contain_text("rolled back")
        screenshot(page, "fleet-after-rollback")
        assert errors.errors == []
        ctx.close()
