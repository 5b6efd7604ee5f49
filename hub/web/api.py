"""The JSON API behind every page (OpenAPI at /openapi.json, a readable reference at /docs).

Reads need the ``read`` permission when ``[http] auth_reads`` is on; labels need ``label``, deploys
and rollbacks ``deploy`` (hub/auth.py ROLES). Authenticate with ``Authorization: Bearer <token>``
(a logged-in browser's session works too, with its CSRF token on writes). Errors: a 4xx/5xx status
and ``{"detail": "one line"}``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from hub import labels as labelmod
from hub.auth import DEPLOY, LABEL, READ, Principal
from hub.errors import TransportError, WebError
from hub.web import charts as chartmod
from hub.web import fleetview, modelsview
from hub.web.context import ctx_of
from hub.web.frames import class_names, frame_json, query_of
from hub.web.principal import need

router = APIRouter(prefix="/api")


class LabelItem(BaseModel):
    frame_id: str = Field(min_length=1, max_length=512)
    label: Optional[str] = Field(None, description="a class name; null or \"\" clears the label; "
                                                   f"{labelmod.UNUSABLE!r} marks the frame unusable")


class LabelRequest(BaseModel):
    items: List[LabelItem] = Field(min_length=1, max_length=labelmod.MAX_BATCH)


class DeployRequest(BaseModel):
    model_name: str = Field(min_length=1, max_length=128)
    version: int = Field(0, ge=0, description="0 = the highest version in the registry")
    device_id: str = Field("", max_length=128, description="exactly one of device_id and group")
    group: str = Field("", max_length=128)


class RollbackRequest(BaseModel):
    device_id: str = Field("", max_length=128, description="exactly one of device_id and group")
    group: str = Field("", max_length=128)


def _announcement(ann: Any) -> Dict[str, Any]:
    d = ann.desired
    return {"topic": ann.topic, "desired": {
        "model_name": d.model_name, "version": int(d.version), "sha256": d.sha256, "size": int(d.size),
        "issued_ms": int(d.issued_ms), "rollback": bool(d.rollback), "grpc_target": d.grpc_target,
        "rollback_from_version": int(d.rollback_from_version)}}


@router.get("/me", tags=["auth"], summary="Who this token or session is, and what it may do")
def me(who: Principal = Depends(need(READ))) -> Dict[str, Any]:
    return {"name": who.name, "role": who.role, "permissions": sorted(who.permissions)}


@router.get("/devices", tags=["fleet"], summary="Every device: desired vs reported, update state, telemetry")
def devices(request: Request, group: str = "", who: Principal = Depends(need(READ))) -> List[Dict[str, Any]]:
    return [fleetview.device_json(d) for d in fleetview.devices(ctx_of(request).store, group or None)]


@router.get("/frames", tags=["frames"], summary="One page of frames (the label queue), newest or least confident "
                                                "first; pass `next` back as `after` for the following page")
def frames(request: Request, device: str = "", group: str = "", model: str = "", version: str = "",
           reason: str = Query("", description="LOW_CONFIDENCE, LOW_MARGIN, HIGH_ENTROPY or TRIAL"),
           min_score: str = Query("", description="top-1 score at least this"),
           below: str = Query("", description="top-1 score under this"),
           state: str = Query("unlabelled", description="unlabelled, labelled, unusable or any"),
           label: str = "", since: str = Query("", description="ISO date-time (UTC) or epoch ms"),
           until: str = "", order: str = Query("newest", description="newest or least_confident"),
           limit: str = "", after: str = Query("", description="the `next` of the previous page"),
           who: Principal = Depends(need(READ))) -> Dict[str, Any]:
    ctx = ctx_of(request)
    q = query_of(dict(request.query_params), ctx.store, ctx.http.page_size)
    page = ctx.store.query_frames(q)
    groups = {d.device_id: d.group for d in ctx.store.list_devices()}
    return {"frames": [frame_json(f, groups) for f in page.frames], "next": page.next,
            "classes": class_names(page.frames, ctx.store.list_models())}


@router.get("/frames/{frame_id:path}", tags=["frames"], summary="One frame (without its image: see image_url)")
def frame(frame_id: str, request: Request, who: Principal = Depends(need(READ))) -> Dict[str, Any]:
    ctx = ctx_of(request)
    rec = ctx.store.get_frame(frame_id)
    if rec is None:
        raise WebError(404, f"frame {frame_id!r} does not exist")
    dev = ctx.store.get_device(rec.device_id)
    return frame_json(rec, {rec.device_id: dev.group} if dev else {})


@router.post("/labels", tags=["frames"], summary="Label frames (one or many; also to clear or undo)")
def set_labels(body: LabelRequest, request: Request, who: Principal = Depends(need(LABEL))) -> Dict[str, Any]:
    """Every label is checked first (400 for a bad one; nothing written). Returns, per frame, the label it
    has now and the one it had before (to undo: send the previous ones back)."""
    ctx = ctx_of(request)
    wanted: Dict[str, Optional[str]] = {}
    for item in body.items:
        wanted[item.frame_id] = item.label
    before = labelmod.set_labels(ctx.store, wanted, by=who.name, clock=ctx.clock)
    return {"by": who.name, "items": [{"frame_id": fid, "label": wanted[fid] or None,
                                       "previous": before.get(fid)} for fid in wanted]}


@router.get("/models", tags=["models"], summary="Every model version with its report figures and devices")
def models(request: Request, who: Principal = Depends(need(READ))) -> List[Dict[str, Any]]:
    ctx = ctx_of(request)
    return modelsview.models(ctx.store.list_models(), fleetview.devices(ctx.store))


def _fleet(request: Request) -> Any:
    fleet = ctx_of(request).fleet
    if fleet is None:
        raise TransportError("this hub runs no fleet service (deploys and rollbacks are unavailable)")
    return fleet


@router.post("/deploy", tags=["models"], summary="Deploy a model version to a group or a device")
def deploy(body: DeployRequest, request: Request, who: Principal = Depends(need(DEPLOY))) -> Dict[str, Any]:
    ann = _fleet(request).deploy(body.model_name, body.version, body.device_id, body.group)
    return _announcement(ann)


@router.post("/rollback", tags=["models"], summary="Roll a group or a device back to its previous model")
def rollback(body: RollbackRequest, request: Request, who: Principal = Depends(need(DEPLOY))) -> Dict[str, Any]:
    return _announcement(_fleet(request).rollback(body.device_id, body.group))


@router.get("/charts", tags=["charts"], summary="The charts' numbers: per model version low-confidence rate and "
                                                "score distribution, fleet fps and latency")
def charts(request: Request, hours: int = Query(6, description=f"one of {chartmod.RANGES_H}"),
           who: Principal = Depends(need(READ))) -> Dict[str, Any]:
    if hours not in chartmod.RANGES_H:
        raise WebError(400, f"hours must be one of {', '.join(map(str, chartmod.RANGES_H))}, not {hours}")
    ctx = ctx_of(request)
    return chartmod.load(ctx.store, ctx.now_ms(), hours).to_json()
