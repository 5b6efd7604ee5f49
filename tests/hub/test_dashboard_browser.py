"""The dashboard in a real browser: headless Chromium (Debian's package) driven by Playwright, against a real
``kestrel-hub serve`` process fed through its real MQTT ingest (embedded Mosquitto, SQLite).

Each page loads with no console error and is saved as a screenshot in test-artifacts/; labelling with
the keyboard (digits, selection, unusable, undo, the type-ahead) persists and comes out of
``kestrel-hub export``; the fleet table updates without a reload. The deploy and rollback from the
Models page against a real edge daemon are in test_dashboard_deploy.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
from playwright.sync_api import expect

from proto import topics
from tests.helpers.wait import wait_for
from tests.hub import REPO, HubProcess, hub_identity, publish_all, write_config
from tests.hub.dashboard import (
    BROWSER_TIMEOUT_MS,
    CLASSES,
    browser,
    http_json,
    login,
    new_page,
    push_models,
    screenshot,
    seed_hub,
    status,
)

pytestmark = pytest.mark.timeout(300)

DEVICES = [("cam-lobby-1", "lobby"), ("cam-lobby-2", "lobby"), ("cam-dock-1", "dock"), ("cam-dock-2", "dock"),
           ("cam-yard-1", "yard")]
FRAMES_PER_DEVICE = 14


class Hub:
    def __init__(self, proc: HubProcess, frames: Dict[str, Any], data: Path, config: Path) -> None:
        self.proc, self.frames, self.data, self.config = proc, frames, data, config
        self.base = f"http://127.0.0.1:{proc.info['http_port']}"
        self.token = (data / "admin-token").read_text().strip()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    tmp = tmp_path_factory.mktemp("dash")
    data = tmp / "hub"
    cfg = write_config(tmp / "hub.toml", data)
    proc = HubProcess(cfg, data, tmp / "hub.log").start()
    try:
        host, port = str(proc.info["mqtt_host"]), int(proc.info["mqtt_port"])  # type: ignore[arg-type]
        frames = seed_hub(host, port, DEVICES, FRAMES_PER_DEVICE, **hub_identity(data))  # the broker speaks TLS
        push_models(f"127.0.0.1:{proc.info['grpc_port']}", data, tmp)
        h = Hub(proc, frames, data, cfg)
        wait_for(lambda: (proc.health().get("ingest") or {}).get("stored") == len(frames), 60, what="frames stored")
        wait_for(lambda: (proc.health().get("ingest") or {}).get("status", 0) >= len(DEVICES), 30, what="statuses")
        yield h
    finally:
        proc.stop()


def _goto(page: Any, url: str) -> None:
    page.goto(url, wait_until="networkidle")


def test_every_page_loads_without_console_errors(hub: Hub) -> None:
    with browser() as b:
        ctx, page, errors = new_page(b)
        login(page, hub.base, hub.token, "/fleet")
        page.wait_for_selector("#fleet-table tbody tr")
        assert page.locator("#fleet-table tbody tr").count() == len(DEVICES)
        row = page.locator('tr[data-device="cam-dock-1"]')
        assert "online" in row.inner_text() and "brightness v2" in row.inner_text()
        assert "0.62" in row.locator("td").nth(7).inner_text()  # the threshold the device reports in force
        screenshot(page, "fleet")
        _goto(page, f"{hub.base}/labels")
        assert page.locator(".card").count() == min(48, len(hub.frames))
        for img in page.locator(".card img").all():  # lazy images load when scrolled to
            img.scroll_into_view_if_needed()
        wait_for(lambda: page.evaluate("() => Array.from(document.querySelectorAll('.card img'))"
                                       ".every(i => i.complete && i.naturalWidth > 0)"), 60, what="thumbnails")
        page.evaluate("window.scrollTo(0, 0)")
        screenshot(page, "labels-full")
        _goto(page, f"{hub.base}/models")
        assert page.locator("article.version").count() == 2
        assert page.locator("svg.matrix").count() == 2
        v2 = page.inner_text("#v-brightness-2")
        for figure in ("int8 accuracy\t83.3%", "sparsity\t50.0%", "latency (trainer machine)\t0.41 ms",
                       "sampling threshold\t0.62", "errors it catches (held-out)\t81.0%"):
            assert figure in v2, (figure, v2)
        screenshot(page, "models")
        _goto(page, f"{hub.base}/charts?hours=1")
        assert page.locator("svg.chart").count() >= 4
        assert page.locator("polyline.line").count() >= 3  # two model versions' rates, and more
        screenshot(page, "charts")
        _goto(page, f"{hub.base}/docs")
        assert page.locator("table.api tbody tr").count() >= 8
        screenshot(page, "api-docs")
        _goto(page, f"{hub.base}/labels?state=any&order=least_confident&reason=LOW_MARGIN")
        assert page.locator(".card").count() > 0
        assert errors.errors == []
        ctx.close()
        ctx, page, errors = new_page(b)  # not logged in: the login page, itself without errors
        _goto(page, f"{hub.base}/labels")
        assert page.url.startswith(f"{hub.base}/login")
        screenshot(page, "login")
        assert errors.errors == []
        ctx.close()


def _card(page: Any, i: int) -> Any:
    return page.locator(".card").nth(i)


def _wait_label(page: Any, i: int, label: str) -> None:
    """The page's own CSP forbids eval (so no wait_for_function): Playwright's expect() waits without it."""
    expect(page.locator(".card").nth(i)).to_have_attribute("data-label", label, timeout=BROWSER_TIMEOUT_MS)


def test_keyboard_labelling_persists_and_is_exported(hub: Hub, tmp_path: Path) -> None:
    with browser() as b:
        ctx, page, errors = new_page(b, 1400, 1000)
        login(page, hub.base, hub.token, "/labels?device=cam-lobby-1")
        page.wait_for_selector(".card.focus")
        ids: List[str] = page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.frameId)")
        classes = page.eval_on_selector_all(".cls[data-class]", "bs => bs.map(b => b.dataset.class)")
        assert classes[:3] == CLASSES and classes[-1] == "_unusable"  # the model's classes, then "unusable"
        page.keyboard.press("1")                       # the focused (first) frame: class 1
        _wait_label(page, 0, "bright")
        expect(page.locator(".card.focus")).to_have_attribute("data-frame-id", ids[1])  # moved on
        page.keyboard.press("s")                       # skip frame 1
        page.keyboard.press("x")                       # select frame 2
        page.keyboard.press("ArrowRight")
        page.keyboard.press("x")                       # and frame 3
        assert page.locator(".card.selected").count() == 2
        page.keyboard.press("2")                       # both: class 2
        _wait_label(page, 2, "dark")
        _wait_label(page, 3, "dark")
        assert page.locator(".card.selected").count() == 0
        page.keyboard.press("u")                       # the next open frame (4): unusable
        _wait_label(page, 4, "_unusable")
        page.keyboard.press("u")                       # frame 5 too ...
        _wait_label(page, 5, "_unusable")
        page.keyboard.press("z")                       # ... undone
        _wait_label(page, 5, "")
        page.keyboard.press("/")                       # the type-ahead: "mi" + Enter = mid
        page.keyboard.type("mi")
        assert page.locator("#suggestions li").first.inner_text() == "mid"
        page.keyboard.press("Enter")
        _wait_label(page, 5, "mid")
        screenshot(page, "label-queue", full_page=False)
        assert errors.errors == []
        # reloaded: the labels are in the store, with who set them
        page.reload(wait_until="networkidle")
        _goto(page, f"{hub.base}/labels?device=cam-lobby-1&state=any")
        got = {c["id"]: c["label"] for c in page.eval_on_selector_all(
            ".card", "cs => cs.map(c => ({id: c.dataset.frameId, label: c.dataset.label}))")}
        assert {ids[0]: "bright", ids[1]: "", ids[2]: "dark", ids[3]: "dark", ids[4]: "_unusable",
                ids[5]: "mid"}.items() <= got.items()
        ctx.close()
    status_, frame = http_json(f"{hub.base}/api/frames/{ids[0]}", hub.token)
    assert status_ == 200 and frame["label"] == "bright" and frame["labelled_by"] == "admin"
    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "-m", "hub", "export", "--config", str(hub.config), "--out", str(out),
                        "--json"], cwd=str(REPO), capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    exported = {f["frame_id"]: (f["label"], f["labelled_by"]) for f in manifest["frames"]}
    assert exported == {ids[0]: ("bright", "admin"), ids[2]: ("dark", "admin"), ids[3]: ("dark", "admin"),
                        ids[5]: ("mid", "admin")}
    assert manifest["unusable"] == 1 and manifest["classes"] == {"bright": 1, "dark": 2, "mid": 1}
    assert (out / "dark" / f"{ids[2]}.jpg").read_bytes() == hub.frames[ids[2]].image


def test_fleet_table_updates_without_a_reload(hub: Hub) -> None:
    host, port = str(hub.proc.info["mqtt_host"]), int(hub.proc.info["mqtt_port"])  # type: ignore[arg-type]
    with browser() as b:
        ctx, page, errors = new_page(b)
        login(page, hub.base, hub.token, "/fleet")
        page.evaluate("window.__loaded_once = true")  # gone if the page reloads
        row = 'tr[data-device="cam-yard-1"]'
        assert "online" in page.inner_text(row)
        publish_all(host, port, [(topics.status("cam-yard-1"), status(
            "cam-yard-1", "yard", 1, state="offline", update="ROLLED_BACK", reason="trial: crashed twice",
            previous=0).SerializeToString())], **hub_identity(hub.data))
        expect(page.locator(row)).to_have_class("offline", timeout=BROWSER_TIMEOUT_MS)
        text = page.inner_text(row)
        assert "rolled back" in text and "trial: crashed twice" in text and "brightness v1" in text
        assert page.evaluate("window.__loaded_once") is True
        screenshot(page, "fleet-live")
        assert errors.errors == []
        ctx.close()
    publish_all(host, port, [(topics.status("cam-yard-1"), status("cam-yard-1", "yard", 2, previous=1)
                              .SerializeToString())], **hub_identity(hub.data))


def test_stored_images_are_served_only_for_frames_that_exist(hub: Hub) -> None:
    import http.client

    fid = sorted(hub.frames)[0]
    with browser() as b:
        ctx, page, errors = new_page(b)
        login(page, hub.base, hub.token, "/fleet")
        resp = page.request.get(f"{hub.base}/frames/{fid}/image")
        assert resp.status == 200 and resp.body() == hub.frames[fid].image
        assert resp.headers["content-type"] == "image/jpeg"
        thumb = page.request.get(f"{hub.base}/frames/{fid}/thumb")
        assert thumb.status == 200 and thumb.body()[:2] == b"\xff\xd8" and thumb.headers["etag"]
        assert page.request.get(f"{hub.base}/frames/no-such-frame/image").status == 404
        ctx.close()
    port = int(hub.proc.info["http_port"])  # type: ignore[arg-type]
    auth = {"Authorization": f"Bearer {hub.token}"}
    for path in ("/frames/../../../etc/passwd/image", "/frames/..%2F..%2Fhub.db/image", "/frames/%2Fetc%2Fpasswd/image",
                 f"/frames/{fid}/../../hub.db/image", "/frames//etc/passwd/image", "/static/../hub.db",
                 "/static/..%2F..%2Fhub.db"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)  # sends the path as it is: no normalising
        conn.request("GET", path, headers=auth)
        r = conn.getresponse()
        body = r.read()
        conn.close()
        assert r.status == 404, (path, r.status, body[:200])
        assert b"SQLite" not in body and b"root:" not in body
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", f"/frames/{fid}/image")  # no token (auth_reads = true)
    r = conn.getresponse()
    r.read()
    assert r.status == 401


def test_writes_without_a_token_or_the_right_role_are_refused(hub: Hub) -> None:
    fid = sorted(hub.frames)[-1]
    body = {"items": [{"frame_id": fid, "label": "bright"}]}
    assert http_json(f"{hub.base}/api/labels", method="POST", body=body)[0] == 401
    assert http_json(f"{hub.base}/api/labels", "kst_not-a-token", method="POST", body=body)[0] == 401
    assert http_json(f"{hub.base}/api/deploy", method="POST", body={"model_name": "brightness", "group": "x"})[0] == 401
    assert http_json(f"{hub.base}/api/rollback", method="POST", body={"group": "lobby"})[0] == 401
    r = subprocess.run([sys.executable, "-m", "hub", "tokens", "--config", str(hub.config), "add", "vera", "--role",
                        "viewer"], cwd=str(REPO), capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr
    viewer = r.stdout.splitlines()[0].strip()
    code, detail = http_json(f"{hub.base}/api/labels", viewer, method="POST", body=body)
    assert code == 403 and "may not label" in detail["detail"]
    assert http_json(f"{hub.base}/api/frames?limit=1", viewer)[0] == 200  # reading is fine
    status_, frame = http_json(f"{hub.base}/api/frames/{fid}", hub.token)
    assert frame["label"] is None  # nothing was written
    with browser() as b:  # a logged-in browser session: a write without its CSRF token is refused
        ctx, page, errors = new_page(b)
        login(page, hub.base, hub.token, "/fleet")
        no_csrf = page.request.post(f"{hub.base}/api/labels", data=body)
        assert no_csrf.status == 403 and "CSRF" in no_csrf.json()["detail"]
        csrf = page.get_attribute('meta[name="csrf-token"]', "content")
        ok = page.request.post(f"{hub.base}/api/labels", data=body, headers={"X-CSRF-Token": csrf})
        assert ok.status == 200 and ok.json()["items"][0]["previous"] is None
        cookies = {c["name"]: c for c in ctx.cookies()}
        assert cookies["kestrel_session"]["httpOnly"] and cookies["kestrel_session"]["sameSite"] == "Strict"
        ctx.close()
    assert http_json(f"{hub.base}/api/labels", hub.token, method="POST",
                     body={"items": [{"frame_id": fid, "label": None}]})[0] == 200
