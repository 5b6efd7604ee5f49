"""The hub's HTTP side: the dashboard (fleet, label queue, models, charts), its JSON API, /healthz and
/metrics; a FastAPI app served by uvicorn inside ``kestrel-hub serve`` (docs/dashboard.md, ADR 0016).

``app.create_app(WebContext)`` builds the app; ``server.WebServer`` runs it on a thread of the hub.
Modules: ``context`` (what the routes need), ``principal`` (tokens, sessions, CSRF, roles per
request), ``login`` (/login, /logout), ``ops`` (/healthz, /metrics), ``api`` (JSON), ``pages`` and
``render`` (HTML), ``images`` (frame images and thumbnails), ``frames`` / ``fleetview`` /
``modelsview`` (what the pages and the API show), ``charts`` + ``svg`` (the charts), ``errors`` (4xx/5xx
answers of hub.errors' WebError, LoginRequired and the other Kestrel errors).
"""
