"""The dashboard's pages, rendered on the server (Jinja2, hub/templates/) with a little static JavaScript
(hub/static/): Fleet (live), Labels (the queue), Models (deploy, roll back), Charts, and the API
reference. Every page reads with ``need(READ)``; writes go through the JSON API (hub/web/api.py)."""

from __future__ import annotations

from typing import Any, Dict

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from hub.auth import READ, Principal
from hub.store.query import LABEL_STATES, ORDERS, REASONS
from hub.web import charts as chartmod
from hub.web import fleetview, modelsview
from hub.web.context import ctx_of
from hub.web.frames import ago, class_names, filters_of, frame_json, query_of
from hub.web.principal import need
from hub.web.render import render

router = APIRouter(include_in_schema=False)


@router.get("/")
def home() -> Response:
    return RedirectResponse("/fleet", status_code=303)


def _fleet(request: Request) -> Dict[str, Any]:
    ctx = ctx_of(request)
    rows = [fleetview.device_json(d) for d in fleetview.devices(ctx.store)]
    now = ctx.now_ms()
    for r in rows:
        r["last_seen_ago"] = ago(r["last_seen_ms"], now)
    return {"rows": rows, "summary": fleetview.summary(rows), "refresh_ms": int(ctx.http.refresh_s * 1000)}


@router.get("/fleet")
def fleet_page(request: Request, who: Principal = Depends(need(READ))) -> Response:
    return render(request, "fleet.html", _fleet(request))


@router.get("/fleet/rows")
def fleet_rows(request: Request, who: Principal = Depends(need(READ))) -> Response:
    """The fleet table's body, for the page's periodic refresh."""
    return render(request, "fleet_rows.html", _fleet(request))


@router.get("/labels")
def labels_page(request: Request, who: Principal = Depends(need(READ))) -> Response:
    ctx = ctx_of(request)
    params = dict(request.query_params)
    q = query_of(params, ctx.store, ctx.http.page_size)
    page = ctx.store.query_frames(q)
    devices = ctx.store.list_devices()
    groups = {d.device_id: d.group for d in devices}
    models = ctx.store.list_models()
    frames = [frame_json(f, groups) for f in page.frames]
    filters = filters_of(params)
    return render(request, "labels.html", {
        "frames": frames, "next": page.next, "filters": filters, "classes": class_names(page.frames, models),
        "devices": sorted(groups), "groups": sorted(set(groups.values())),
        "model_names": sorted({m.model_name for m in models}), "versions": sorted({m.version for m in models}),
        "reasons": REASONS, "states": LABEL_STATES, "orders": ORDERS, "waiting": ctx.store.count_unlabelled(),
        "first_page": not params.get("after"), "query": q})


@router.get("/models")
def models_page(request: Request, who: Principal = Depends(need(READ))) -> Response:
    ctx = ctx_of(request)
    devices = fleetview.devices(ctx.store)
    versions = modelsview.models(ctx.store.list_models(), devices)
    names = []
    for v in versions:
        if v["model_name"] not in names:
            names.append(v["model_name"])
    return render(request, "models.html", {
        "names": names, "versions": versions, "groups": sorted({d.group for d in devices}),
        "devices": sorted(d.device_id for d in devices), "deploys_enabled": ctx.fleet is not None})


@router.get("/charts")
def charts_page(request: Request, hours: int = 6, who: Principal = Depends(need(READ))) -> Response:
    ctx = ctx_of(request)
    c = chartmod.load(ctx.store, ctx.now_ms(), hours)
    return render(request, "charts.html", {"c": c, "ranges": chartmod.RANGES_H})


@router.get("/docs")
def api_docs(request: Request) -> Response:
    """The API reference, from the app's OpenAPI document (no script from the internet: works offline)."""
    spec = request.app.openapi()
    ops = []
    for path, methods in sorted(spec.get("paths", {}).items()):
        for method, op in methods.items():
            params = [{"name": p["name"], "in": p["in"], "required": p.get("required", False),
                       "description": p.get("description", ""),
                       "type": (p.get("schema") or {}).get("type", (p.get("schema") or {}).get("anyOf", [{}])[0]
                                                           .get("type", ""))}
                      for p in op.get("parameters", [])]
            body = (((op.get("requestBody") or {}).get("content") or {}).get("application/json") or {}).get("schema")
            ops.append({"method": method.upper(), "path": path, "summary": op.get("summary", ""),
                        "description": op.get("description", ""), "params": params,
                        "body": (body or {}).get("$ref", "").rsplit("/", 1)[-1], "tags": op.get("tags", [])})
    schemas = spec.get("components", {}).get("schemas", {})
    return render(request, "docs.html", {"ops": ops, "schemas": schemas})
