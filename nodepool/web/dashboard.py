"""The launcher's live dashboard: one JSON document read from the store, and the static page
(plain HTML, JS and SVG shipped in ``nodepool/web/static``; no build step, no CDN) that polls it.

Routes served by ``app.StatusWebApp``: ``/dashboard`` (the page), ``/dashboard/<file>`` (its
static files) and ``/dashboard.json`` (the data, see ``dashboard_data``).
"""
import os

from .. import waits
from ..config.rollout import policy_for
from ..model.rollout import pair_status

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "application/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}

WINDOW = 3600.0           # seconds of wait history shown
SERIES_BUCKETS = 30
FAILURES_SHOWN = 20

# node states grouped into the dashboard's columns
_COLUMNS = {"ready": "ready", "in-use": "in_use", "init": "building", "building": "building",
            "testing": "building", "deleting": "deleting", "used": "deleting",
            "failed": "failed", "aborted": "failed", "hold": "hold"}


def _state(record):
    return getattr(record.state, "value", record.state)


def _age(now, then):
    return None if not then else max(0.0, now - then)


def node_table(nodes, config):
    """Rows per (label, provider): ready (free), allocated ready, in-use, building, ..."""
    rows = {}
    if config is not None:
        for prov_name, prov in config.providers.items():
            for pool in prov.pools.values():
                for label in pool.labels:
                    rows.setdefault((label, prov_name), None)
    counts = {}
    for key in rows:
        counts[key] = dict.fromkeys(
            ("ready", "allocated", "in_use", "building", "deleting", "failed", "hold"), 0)
    for node in nodes:
        column = _COLUMNS.get(_state(node))
        if column is None:
            continue
        if column == "ready" and node.allocated_to:
            column = "allocated"
        for label in set(node.type or ()):
            key = (label, node.provider or "")
            row = counts.setdefault(key, dict.fromkeys(
                ("ready", "allocated", "in_use", "building", "deleting", "failed", "hold"), 0))
            row[column] += 1
    return [dict(label=label, provider=provider, **row)
            for (label, provider), row in sorted(counts.items())]


def waiting_requests(requests, now):
    out = []
    for req in requests:
        if _state(req) not in ("requested", "pending"):
            continue
        out.append({"id": req.id, "labels": list(req.node_types), "state": _state(req),
                    "requestor": req.requestor, "tenant": req.tenant_name,
                    "age": _age(now, req.created_time), "declined_by": len(req.declined_by)})
    out.sort(key=lambda r: -(r["age"] or 0))
    return out


def image_table(uploads, now, config=None):
    """Per (image, provider): the current and previous ready upload, with ages.  Under an
    image rollout (docs/rollout.md) the current upload is the one that serves, which may be
    older than a candidate being validated or rolled out (the row's ``candidate``)."""
    by_key = {}
    for up in uploads:
        by_key.setdefault((up.image, up.provider), []).append(up)
    rows = []
    for (image, provider), ups in sorted(by_key.items()):
        ready = sorted((u for u in ups if _state(u) == "ready"),
                       key=lambda u: (u.state_time or 0, u.id or ""), reverse=True)

        def brief(u):
            if u is None:
                return None
            return {"build": u.build_id, "upload": u.id, "name": u.external_name,
                    "external_id": str(u.external_id) if u.external_id is not None else None,
                    "age": _age(now, u.state_time)}
        current, candidate = ready[0] if ready else None, None
        if config is not None and policy_for(config, image, provider) is not None:
            status = pair_status(ready, image, provider, True)
            current, candidate = status.current, status.candidate
        older = [] if current is None else ready[ready.index(current) + 1:]
        row = {"image": image, "provider": provider, "current": brief(current),
               "previous": brief(older[0] if older else None),
               "uploading": sum(1 for u in ups if _state(u) == "uploading"),
               "failed": sum(1 for u in ups if _state(u) == "failed")}
        if candidate is not None:
            row["candidate"] = brief(candidate)
        rows.append(row)
    return rows


def dashboard_data(store, config, now, window=WINDOW):
    nodes = store.list_nodes(shared=True)       # only read here
    requests = store.list_requests(shared=True)
    uploads = store.list_uploads()
    launchers = store.list_components("launcher")
    recent = waits.read_waits(launchers)
    labels = sorted({w.label for w in recent if now - w.time <= window})
    return {
        "time": now,
        "window": window,
        "launchers": sorted(c.hostname or "" for c in launchers),
        "nodes": node_table(nodes, config),
        "requests": waiting_requests(requests, now),
        "images": image_table(uploads, now, config),
        "waits": waits.summarize(recent, now, window),
        "series": {"all": waits.series(recent, now, window, SERIES_BUCKETS),
                   **{label: waits.series(recent, now, window, SERIES_BUCKETS, label)
                      for label in labels}},
        "failures": waits.read_failures(launchers)[:FAILURES_SHOWN],
    }


def static_file(name):
    """(body bytes, content type) of a shipped static file, or None (unknown or escaping)."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    path = os.path.join(STATIC_DIR, name)
    ext = os.path.splitext(name)[1]
    if ext not in _TYPES or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return f.read(), _TYPES[ext]
