"""The dashboard's app in process (FastAPI's TestClient, a real SQLite store): auth and roles, sessions and
CSRF, one-line 4xx answers, the JSON API, thumbnails, /metrics, and the charts' arithmetic.
The same app in a real hub process and a real browser: test_dashboard_browser.py, test_dashboard_deploy.py."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from fastapi.testclient import TestClient

from hub import auth
from hub.config import HttpSection
from hub.metrics import HubMetrics
from hub.store.base import ModelRecord
from hub.store.series import SeriesPoint
from hub.store.sqlite import SqliteStore
from hub.web.app import create_app
from hub.web.context import WebContext
from tests.hub.dashboard import picture
from tests.hub.test_store_contract import qrec

HEALTHY: Dict[str, Any] = {"ok": True, "store": {"ok": True}, "broker": {"connected": True}, "ingest": {}}


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


class Web:
    def __init__(self, store: SqliteStore, http: HttpSection, clock: Clock, fleet: Any = None,
                 tokens: Any = None) -> None:
        self.store, self.clock = store, clock
        self.metrics = HubMetrics(lambda: HEALTHY, lambda: store, clock=clock)
        self.ctx = WebContext(store=store, http=http, health=lambda: HEALTHY, metrics=self.metrics, fleet=fleet,
                              clock=clock)
        self.client = TestClient(create_app(self.ctx), follow_redirects=False)
        self.tokens = tokens or {role: auth.add_token(store, f"{role}-1", role) for role in auth.ROLES}

    def h(self, role: str) -> Dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def login(self, role: str = "labeller") -> str:
        """Log the client in through the form; returns the session's CSRF token (from a page)."""
        page = self.client.get("/login")
        csrf_login = re.search(r'id="login-csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        r = self.client.post("/login", data={"token": self.tokens[role], "csrf": csrf_login, "next": "/labels"})
        assert r.status_code == 303 and r.headers["location"] == "/labels"
        page = self.client.get("/fleet")
        return re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text).group(1)  # type: ignore


@pytest.fixture
def web(tmp_path: Path) -> Iterator[Web]:
    store = SqliteStore(tmp_path / "hub.db")
    frames = [dataclasses.replace(qrec(f"f{i}", f"cam-{i % 3}", 1_700_000_000_000 + i, 0.1 + i / 100),
                                  image=picture(i)) for i in range(30)]
    store.add_frames(frames)
    for i in range(3):
        store.upsert_device(f"cam-{i}", group="lobby" if i < 2 else "dock", state="online")
    w = Web(store, HttpSection(), Clock())
    yield w
    store.close()


def test_reads_need_a_token_unless_auth_reads_is_off(web: Web, tmp_path: Path) -> None:
    r = web.client.get("/api/frames")
    assert r.status_code == 401 and r.json() == {"detail": "log in first: send Authorization: Bearer <token> or "
                                                           "log in at /login"}
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = web.client.get("/labels?device=cam-1")
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Flabels%3Fdevice%3Dcam-1"
    assert web.client.get("/api/frames", headers=web.h("viewer")).status_code == 200
    assert web.client.get("/healthz").status_code == 200 and web.client.get("/metrics").status_code == 200
    assert web.client.get("/docs").status_code == 200 and web.client.get("/openapi.json").status_code == 200
    open_web = Web(web.store, HttpSection(auth_reads=False), web.clock, tokens=web.tokens)
    assert open_web.client.get("/api/frames").status_code == 200
    assert open_web.client.get("/labels").status_code == 200
    r = open_web.client.post("/api/labels", json={"items": [{"frame_id": "f1", "label": "cat"}]})
    assert r.status_code == 401  # writes never go without a token
    assert web.store.get_frame("f1").label is None  # type: ignore[union-attr]


@pytest.mark.parametrize("role,label_ok,deploy_ok", [("viewer", False, False), ("labeller", True, False),
                                                     ("operator", True, True), ("admin", True, True)])
def test_roles(web: Web, role: str, label_ok: bool, deploy_ok: bool) -> None:
    r = web.client.post("/api/labels", json={"items": [{"frame_id": "f2", "label": "cat"}]}, headers=web.h(role))
    assert r.status_code == (200 if label_ok else 403), r.text
    r = web.client.post("/api/deploy", json={"model_name": "m", "group": "lobby"}, headers=web.h(role))
    assert r.status_code == (503 if deploy_ok else 403), r.text  # no fleet service in this app: 503 after the role
    assert web.client.get("/api/me", headers=web.h(role)).json()["role"] == role
    r = web.client.post("/api/rollback", json={"group": "lobby"}, headers=web.h(role))
    assert r.status_code == (503 if deploy_ok else 403), r.text


@pytest.mark.parametrize("role", ["trainer", "device"])
def test_the_machines_tokens_do_not_open_the_dashboard(web: Web, role: str) -> None:
    """One token system for gRPC and the dashboard: a trainer's (push) or a device's (fetch) token reads,
    labels and deploys nothing here, and cannot log in."""
    assert web.client.get("/api/frames", headers=web.h(role)).status_code == 403
    r = web.client.post("/api/labels", json={"items": [{"frame_id": "f2", "label": "cat"}]}, headers=web.h(role))
    assert r.status_code == 403
    assert web.client.post("/api/deploy", json={"model_name": "m", "group": "lobby"},
                           headers=web.h(role)).status_code == 403
    page = web.client.get("/login")
    csrf = re.search(r'id="login-csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    r = web.client.post("/login", data={"token": web.tokens[role], "csrf": csrf, "next": "/fleet"})
    assert r.status_code == 403 and "for a machine" in r.text and "kestrel_session" not in r.headers["set-cookie"]


def test_fleet_shows_a_device_that_overrides_its_group_and_revoked_identities(web: Web) -> None:
    """Issue 11: the fleet view says when a device-level desired state hides its group's, and shows identities."""
    web.store.set_group_desired("lobby", "m", 3, False, 1)
    web.store.upsert_device("cam-0", desired_model="m", desired_version=2, desired_scope="device",
                            enrolled_group="lobby", enrolled_ms=5)
    web.store.upsert_device("cam-1", enrolled_group="lobby", enrolled_ms=5, revoked_ms=9)
    rows = {d["device_id"]: d for d in web.client.get("/api/devices", headers=web.h("viewer")).json()}
    assert rows["cam-0"]["overrides_group"] is True and rows["cam-0"]["desired_version"] == 2
    assert rows["cam-1"]["overrides_group"] is False and rows["cam-1"]["desired_version"] == 3  # the group's
    assert (rows["cam-1"]["enrolled_group"], rows["cam-1"]["revoked_ms"]) == ("lobby", 9)
    page = web.client.get("/fleet", headers=web.h("viewer")).text
    assert "pinned, overrides group" in page and ">revoked</small>" in page


def test_a_revoked_token_stops_working_and_ends_its_sessions(web: Web) -> None:
    csrf = web.login("labeller")
    assert web.client.get("/api/me").json()["name"] == "labeller-1"
    auth.revoke_token(web.store, "labeller-1")
    assert web.client.get("/api/me").status_code == 401
    assert web.client.get("/api/me", headers=web.h("labeller")).status_code == 401
    r = web.client.post("/api/labels", json={"items": [{"frame_id": "f1", "label": "cat"}]},
                        headers={"X-CSRF-Token": csrf})
    assert r.status_code == 401


def test_sessions_need_csrf_on_writes_and_expire(web: Web) -> None:
    csrf = web.login("labeller")
    body = {"items": [{"frame_id": "f3", "label": "cat"}]}
    r = web.client.post("/api/labels", json=body)
    assert r.status_code == 403 and "CSRF" in r.json()["detail"]
    r = web.client.post("/api/labels", json=body, headers={"X-CSRF-Token": csrf + "x"})
    assert r.status_code == 403
    r = web.client.post("/api/labels", json=body, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["by"] == "labeller-1"
    cookie = web.client.cookies.get("kestrel_session")
    assert cookie and web.store.get_session(cookie) is None  # only its hash is stored
    r = web.client.post("/logout", data={"csrf": "wrong"})
    assert r.status_code == 403
    web.clock.t += 12 * 3600 + 1  # [http] session_hours = 12
    assert web.client.get("/api/me").status_code == 401


def test_login_form_is_protected_and_never_redirects_away(web: Web) -> None:
    page = web.client.get("/login?next=//evil.example/x")
    csrf = re.search(r'id="login-csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    assert 'name="next" value="/"' in page.text
    r = web.client.post("/login", data={"token": web.tokens["viewer"], "csrf": "forged", "next": "/fleet"})
    assert r.status_code == 403
    r = web.client.post("/login", data={"token": "kst_wrong", "csrf": csrf, "next": "/fleet"})
    assert r.status_code == 401 and "not valid" in r.text
    for target in ("https://evil.example/", "//evil.example", "/\\evil.example"):
        page = web.client.get("/login")  # a login uses up the form's value: a fresh form each time
        csrf = re.search(r'id="login-csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        r = web.client.post("/login", data={"token": web.tokens["viewer"], "csrf": csrf, "next": target})
        assert r.status_code == 303 and r.headers["location"] == "/", target
        set_cookie = r.headers["set-cookie"]
        assert "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie.replace("Strict", "strict")


def test_bad_requests_are_4xx_with_one_line(web: Web) -> None:
    h = web.h("admin")
    cases: List[Tuple[str, str, Any, int, str]] = [
        ("GET", "/api/frames?limit=abc", None, 400, "limit must be an integer"),
        ("GET", "/api/frames?order=random", None, 400, "order must be one of"),
        ("GET", "/api/frames?after=garbage!!", None, 400, "cursor"),
        ("GET", "/api/frames?since=yesterday", None, 400, "since must be an ISO date-time"),
        ("GET", "/api/frames?below=nan", None, 400, "finite"),
        ("GET", "/api/frames/no-such-frame", None, 404, "does not exist"),
        ("GET", "/api/charts?hours=5", None, 400, "hours must be one of"),
        ("GET", "/api/nothing-here", None, 404, "nothing at /api/nothing-here"),
        ("POST", "/api/labels", {"items": [{"frame_id": "f1", "label": "../etc"}]}, 400, "invalid label"),
        ("POST", "/api/labels", {"items": [{"frame_id": "ghost", "label": "cat"}]}, 404, "'ghost' does not exist"),
        ("POST", "/api/labels", {"items": []}, 400, "invalid items"),
        ("POST", "/api/labels", {"wrong": 1}, 400, "invalid items: Field required"),
        ("POST", "/api/deploy", {"model_name": ""}, 400, "invalid model_name"),
    ]
    for method, path, body, status, text in cases:
        r = web.client.request(method, path, json=body, headers=h)
        assert r.status_code == status and text in r.json()["detail"], (path, r.status_code, r.text)
        assert "\n" not in r.json()["detail"] and "Traceback" not in r.text
    r = web.client.post("/api/labels", content=b"{not json", headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 400 and "Traceback" not in r.text
    r = web.client.get("/nope", headers=h)
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html") and "nothing at /nope" in r.text
    assert web.store.get_frame("f1").label is None  # type: ignore[union-attr]  # nothing written by the bad ones


def test_an_unexpected_failure_is_a_500_with_one_line(web: Web, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: Any, **k: Any) -> Any:
        raise RuntimeError("secret internals\nline two")
    monkeypatch.setattr(web.store, "query_frames", boom)
    client = TestClient(web.client.app, raise_server_exceptions=False)
    r = client.get("/api/frames", headers=web.h("viewer"))
    assert r.status_code == 500 and r.json() == {"detail": "internal error; the hub's log has the details"}


def test_labels_many_at_once_and_undo_through_the_api(web: Web) -> None:
    h = web.h("labeller")
    r = web.client.post("/api/labels", headers=h, json={"items": [
        {"frame_id": "f1", "label": "cat"}, {"frame_id": "f2", "label": "cat"},
        {"frame_id": "f3", "label": "_unusable"}]})
    assert r.json()["items"] == [{"frame_id": "f1", "label": "cat", "previous": None},
                                 {"frame_id": "f2", "label": "cat", "previous": None},
                                 {"frame_id": "f3", "label": "_unusable", "previous": None}]
    undo = [{"frame_id": it["frame_id"], "label": it["previous"]} for it in r.json()["items"]]
    page = web.client.get("/api/frames?state=labelled", headers=h).json()
    assert {f["frame_id"] for f in page["frames"]} == {"f1", "f2"}
    unusable = web.client.get("/api/frames?state=unusable", headers=h).json()["frames"]
    assert [(f["frame_id"], f["unusable"], f["label"]) for f in unusable] == [("f3", True, None)]
    assert web.client.post("/api/labels", headers=h, json={"items": undo}).status_code == 200
    assert web.client.get("/api/frames?state=any&label=cat", headers=h).json()["frames"] == []
    assert web.store.count_unlabelled() == 30


def test_frames_api_pages_filters_and_frame_view(web: Web) -> None:
    h = web.h("viewer")
    web.store.add_model(ModelRecord("m", 2, "a" * 64, 1, 1, labels=["zebra", "cat"]))
    first = web.client.get("/api/frames?limit=10&group=lobby&order=least_confident", headers=h).json()
    assert len(first["frames"]) == 10 and all(f["group"] == "lobby" for f in first["frames"])
    scores = [f["top_score"] for f in first["frames"]]
    assert scores == sorted(scores)
    assert first["classes"][:2] == ["zebra", "cat"]  # the model's own classes first, in manifest order
    rest = web.client.get(f"/api/frames?limit=500&group=lobby&order=least_confident&after={first['next']}",
                          headers=h).json()
    assert rest["next"] is None and len(first["frames"]) + len(rest["frames"]) == 20
    f = web.client.get("/api/frames/f4", headers=h).json()
    assert f["device_id"] == "cam-1" and f["image_url"] == "/frames/f4/image" and f["group"] == "lobby"
    assert web.client.get("/api/frames?device=cam-2&below=0.2", headers=h).json()["frames"][0]["frame_id"] == "f8"
    # time filters: ISO (UTC, as the page's date-time fields send it) or epoch ms, the same frames
    iso = web.client.get("/api/frames?since=2023-11-14T22:13:20.025&until=2023-11-14T22:13:20.028", headers=h)
    ms = web.client.get("/api/frames?since=1700000000025&until=1700000000028", headers=h)
    assert [f["frame_id"] for f in iso.json()["frames"]] == [f["frame_id"] for f in ms.json()["frames"]] == \
        ["f27", "f26", "f25"]


def test_thumbnails_are_small_cached_and_revalidated(web: Web) -> None:
    h = web.h("viewer")
    r = web.client.get("/frames/f5/thumb", headers=h)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:2] == b"\xff\xd8"
    import cv2
    import numpy as np
    img = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    assert max(img.shape[:2]) <= 192
    assert web.ctx.thumbs.misses == 1
    again = web.client.get("/frames/f5/thumb", headers={**h, "If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and web.ctx.thumbs.hits == 1
    full = web.client.get("/frames/f5/image", headers=h)
    assert full.content == web.store.get_frame("f5").image  # type: ignore[union-attr]
    assert full.headers["x-content-type-options"] == "nosniff"


def test_thumb_cache_evicts_the_least_recently_used() -> None:
    from hub.web.images import ThumbCache
    c = ThumbCache(10)
    c.put("a", b"aaaa", "1")
    c.put("b", b"bbbb", "2")
    assert c.get("a") is not None
    c.put("c", b"cccc", "3")  # 12 bytes > 10: b (least recently used) goes
    assert c.get("b") is None and c.get("a") is not None and c.get("c") is not None
    c.put("huge", b"x" * 11, "4")
    assert c.get("huge") is None


def test_pages_send_a_strict_content_security_policy(web: Web) -> None:
    r = web.client.get("/fleet", headers=web.h("viewer"))
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe" not in csp and "frame-ancestors 'none'" in csp
    assert "<script>" not in r.text  # no inline script anywhere (the CSP would block it)


def test_metrics_has_fleet_gauges_and_ingest_histograms(web: Web) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    web.store.upsert_device("cam-0", reported_model="m", reported_version=2, update_state="COMMITTED")
    web.store.upsert_device("cam-2", state="offline", reported_model="m", reported_version=1,
                            update_state="ROLLED_BACK")
    web.store.set_labels({"f1": "cat", "f2": "dog"}, 1, by="x")
    now_ms = web.clock() * 1000
    stored = [dataclasses.replace(qrec("h1"), received_ms=int(now_ms - 20), capture_time_ms=int(now_ms - 1500))]
    web.metrics.batch_committed(0.004, stored)
    text = web.client.get("/metrics").text
    s = {(x.name, tuple(sorted(x.labels.items()))): x.value
         for fam in text_string_to_metric_families(text) for x in fam.samples}
    assert s[("kestrel_hub_devices_online", ())] == 2 and s[("kestrel_hub_devices", (("state", "offline"),))] == 1
    assert s[("kestrel_hub_devices_by_model", (("model", "m"), ("update_state", "COMMITTED"), ("version", "2")))] == 1
    assert s[("kestrel_hub_devices_by_model", (("model", "m"), ("update_state", "ROLLED_BACK"), ("version", "1")))] == 1
    assert s[("kestrel_hub_frames_unlabelled", ())] == 28
    assert s[("kestrel_hub_ingest_commit_seconds_count", ())] == 1
    assert s[("kestrel_hub_ingest_commit_seconds_bucket", (("le", "0.005"),))] == 1
    assert s[("kestrel_hub_frame_received_to_stored_seconds_bucket", (("le", "0.025"),))] == 1
    assert s[("kestrel_hub_frame_capture_to_stored_seconds_bucket", (("le", "1.0"),))] == 0
    assert s[("kestrel_hub_frame_capture_to_stored_seconds_bucket", (("le", "2.5"),))] == 1
    assert not any(name.endswith("_created") for name, _ in s)


def _point(device: str, minute: int, processed: int, low: int, hist: List[int], version: int = 1,
           uptime: float = 0.0, fps: float = 10.0, p50: float = 10.0, p95: float = 20.0) -> SeriesPoint:
    m = 1_800_000_000_000 - 1_800_000_000_000 % 60_000 + minute * 60_000
    return SeriesPoint(device, m, m + 1000, "m", version, fps, p50, p95, 0, 0, uptime or 60.0 * (minute + 100),
                       processed, 0, low, hist)


def test_charts_take_differences_per_device_and_restart_on_a_restart() -> None:
    from hub.web.charts import compute
    now = 1_800_000_000_000 - 1_800_000_000_000 % 60_000 + 10 * 60_000
    pts = [_point("a", 0, 100, 10, [10, 90]), _point("a", 1, 200, 40, [40, 160]),        # +100 frames, 30 low
           _point("a", 2, 50, 25, [25, 25], version=2, uptime=5.0),                      # restart: its own 50 / 25
           _point("b", 1, 1000, 0, [0, 1000]), _point("b", 2, 1100, 50, [50, 1050], fps=5.0, p95=90.0)]
    c = compute(pts, now, 1)
    i1, i2 = (c.buckets.index(p.minute_ms) for p in pts[1:3])
    assert c.versions == ["m v2", "m v1"]
    assert c.low_conf_rate["m v1"][i1] == pytest.approx(30 / 100)
    assert c.low_conf_rate["m v1"][i2] == pytest.approx(50 / 100)       # device b only: a moved to v2
    assert c.low_conf_rate["m v2"][i2] == pytest.approx(25 / 50)
    assert c.low_conf_rate["m v1"][0] is None                          # no frames: a gap, not a zero
    assert c.frames == {"m v1": 200, "m v2": 50}
    assert c.score_hist["m v2"] == [0.5, 0.5]
    assert c.score_hist["m v1"] == pytest.approx([80 / 200, 120 / 200])
    assert c.score_p50["m v1"][i1] == pytest.approx(0.5 + 0.5 * (50 - 30) / 70)  # linear within the bin
    assert c.fleet_fps[i2] == pytest.approx(15.0) and c.latency_p95[i2] == 90.0 and c.devices == 2


def test_a_store_without_tokens_gets_an_admin_token_file(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "fresh.db")
    try:
        made = auth.ensure_admin_token(store, tmp_path)
        assert made == tmp_path / "admin-token" and made.stat().st_mode & 0o777 == 0o600
        token = made.read_text().strip()
        who = auth.authenticate(store, token)
        assert who is not None and who.role == "admin" and who.can(auth.ADMIN)
        assert auth.ensure_admin_token(store, tmp_path) is None  # there is an active token now
        assert made.read_text().strip() == token
        auth.revoke_token(store, "admin")
        again = auth.ensure_admin_token(store, tmp_path)  # every token revoked: a new one, a new file
        assert again == made and made.read_text().strip() != token
        assert auth.authenticate(store, token) is None and auth.authenticate(store, made.read_text().strip())
    finally:
        store.close()


def test_housekeeping_drops_old_points_and_expired_sessions(tmp_path: Path) -> None:
    from hub.server import housekeep
    from hub.store.authrecords import SessionRecord
    store = SqliteStore(tmp_path / "hk.db")
    try:
        now = 1_800_000_000_000
        store.add_series([SeriesPoint("d", now - 49 * 3600 * 1000, now - 49 * 3600 * 1000),
                          SeriesPoint("d", now - 47 * 3600 * 1000, now - 47 * 3600 * 1000)])
        store.add_session(SessionRecord("old", "x", "c", 0, now - 1))
        store.add_session(SessionRecord("new", "x", "c", 0, now + 1))
        assert housekeep(store, 48.0, now) == (1, 1)
        assert len(store.list_series(0)) == 1 and store.get_session("new") is not None
    finally:
        store.close()
