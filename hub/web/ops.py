"""``GET /healthz`` (JSON; 200 healthy, 503 not, same body) and ``GET /metrics`` (Prometheus text through
prometheus_client, hub/metrics.py). Neither needs a token: a load balancer and Prometheus read them,
and neither shows frames or device details beyond counts."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import Response

from hub.metrics import CONTENT_TYPE
from hub.web.context import ctx_of

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Health of the store, broker connection and ingest (200 or 503)")
def healthz(request: Request) -> Response:
    h = ctx_of(request).health()
    return Response(json.dumps(h, indent=1) + "\n", status_code=200 if h.get("ok") else 503,
                    media_type="application/json")


@router.get("/metrics", summary="Prometheus metrics (text format 0.0.4)")
def metrics(request: Request) -> Response:
    return Response(ctx_of(request).metrics.render(), media_type=CONTENT_TYPE)
