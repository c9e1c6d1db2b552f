"""The launcher's status web app: listings as text or JSON, a readiness probe and metrics.

Endpoints (Nodepool 11): ``/ready``, ``/node-list`` (``node_id``), ``/image-list``,
``/dib-image-list``, ``/image-status``, ``/request-list``, ``/label-list``, each also as
``<path>.json``; ``fields=a,b`` picks columns.  JSON is served when the path ends in ``.json`` or
``Accept`` prefers ``application/json``; otherwise the same left-aligned text table the CLI prints.
``/metrics`` serves Prometheus text; ``/dashboard`` a live page (see ``dashboard``).  A failing
store never takes the server down: the request gets a one-line 500.
"""
import email.utils
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from ..cli import tables
from ..metrics import store_collector
from . import dashboard

log = logging.getLogger("nodepool.web")

CACHE_SECONDS = 1.0
_OFFERS = ("text/plain", "text/html", "application/json")


def wants_json(accept):
    """True if ``application/json`` is the best of our offers for an ``Accept`` header.

    Ties go to text (the first offer), so ``*/*`` and a missing header get text."""
    if not accept:
        return False
    ranges = []
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        if not media:
            continue
        q = 1.0
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        ranges.append((media, q))

    def quality(offer):
        kind = offer.split("/")[0]
        best, best_specificity = 0.0, -1
        for media, q in ranges:
            if media == offer:
                specificity = 2
            elif media == f"{kind}/*":
                specificity = 1
            elif media == "*/*":
                specificity = 0
            else:
                continue
            if specificity > best_specificity:
                best, best_specificity = q, specificity
        return best

    scores = [quality(o) for o in _OFFERS]
    top = max(scores)
    return top > 0 and scores.index(top) == _OFFERS.index("application/json")


class StatusWebApp:
    """Serves the status endpoints from ``store`` in a daemon thread.

    ``get_config`` returns the current loaded config (it changes on reload); ``ready`` is set
    by the launcher after its first full pass.  ``port`` 0 picks a free port (see ``.port``)."""

    def __init__(self, store, get_config, port=8005, listen_address="0.0.0.0", clock=time.time):
        self.store = store
        self.get_config = get_config
        self.requested_port = port
        self.listen_address = listen_address
        self.clock = clock
        self.ready = False
        self.server = None
        self.thread = None
        self._cache = {}
        self._cache_lock = threading.Lock()
        self.metrics_registry = CollectorRegistry(auto_describe=False)
        self.metrics_registry.register(store_collector(store))

    @property
    def port(self):
        return self.server.server_address[1] if self.server else self.requested_port

    def start(self):
        app = self

        class Handler(StatusRequestHandler):
            webapp = app

        self.server = ThreadingHTTPServer((self.listen_address, self.requested_port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="StatusWebApp",
                                       daemon=True)
        self.thread.start()
        log.info("status web app listening on %s:%s", self.listen_address, self.port)

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(10)
            self.server = None

    # -- content ---------------------------------------------------------------------------------

    def listing(self, name, as_json, fields=None, node_id=None):
        """The body of a listing, memoised for ``CACHE_SECONDS`` per (name, params, format)."""
        key = (name, as_json, tuple(fields or ()), node_id)
        now_mono = time.monotonic()
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None and now_mono - hit[0] < CACHE_SECONDS:
                return hit[1]
        now = self.clock()
        try:
            config = self.get_config() if self.get_config else None
        except Exception:
            config = None
        detail = name == "node-list"
        listing, rows = tables.read_listing(name, self.store, now, config=config, detail=detail,
                                            node_id=node_id)
        if as_json:
            body = tables.render_json(listing, rows, fields)
        else:
            if not fields and name == "node-list":
                listing = tables.NODE_LIST       # the short table unless columns are asked for
            body = tables.render_text(listing, rows, now, fields) + "\n"
        with self._cache_lock:
            self._cache = {k: v for k, v in self._cache.items()
                           if now_mono - v[0] < CACHE_SECONDS}
            self._cache[key] = (now_mono, body)
        return body

    def dashboard(self, path):
        """(status, body, content type) of the dashboard page, its files and its data."""
        if path == "/dashboard.json":
            try:
                config = self.get_config() if self.get_config else None
            except Exception:
                config = None
            data = dashboard.dashboard_data(self.store, config, self.clock())
            return 200, json.dumps(data, sort_keys=True), "application/json"
        found = dashboard.static_file(path[len("/dashboard/"):] if path.startswith(
            "/dashboard/") else "dashboard.html")
        if found is None:
            return 404, f"not found: {path}\n", "text/plain; charset=utf-8"
        return 200, found[0], found[1]

    def metrics(self):
        return generate_latest(REGISTRY) + generate_latest(self.metrics_registry)


class StatusRequestHandler(BaseHTTPRequestHandler):
    webapp = None
    server_version = "nodepool-web"

    def log_message(self, fmt, *args):
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, status, body, content_type="text/plain; charset=utf-8", cache=True):
        if isinstance(body, str):
            body = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Access-Control-Allow-Origin", "*")
        if cache and status == 200:
            now = time.time()
            self.send_header("Cache-Control", f"public, max-age={int(CACHE_SECONDS)}")
            self.send_header("Last-Modified", email.utils.formatdate(now, usegmt=True))
            self.send_header("Expires", email.utils.formatdate(now + CACHE_SECONDS, usegmt=True))
        else:
            self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        app = self.webapp
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        params = parse_qs(url.query)
        try:
            if path == "/ready":
                if app.ready:
                    return self._send(200, "OK", cache=False)
                return self._send(503, "not ready: the launcher has not completed a pass yet\n",
                                  cache=False)
            if path == "/metrics":
                return self._send(200, app.metrics(), CONTENT_TYPE_LATEST, cache=False)
            if path == "/dashboard.json" or path == "/dashboard" \
                    or path.startswith("/dashboard/"):
                return self._send(*app.dashboard(path), cache=False)
            name = path.lstrip("/")
            as_json = False
            if name.endswith(".json"):
                name, as_json = name[:-len(".json")], True
            if name not in tables.LISTING_NAMES:
                return self._send(404, f"not found: {url.path}\n", cache=False)
            as_json = as_json or wants_json(self.headers.get("Accept"))
            fields = [f for v in params.get("fields", []) for f in v.split(",") if f]
            node_id = params.get("node_id", [None])[0] if name == "node-list" else None
            try:
                body = app.listing(name, as_json, fields, node_id)
            except ValueError as exc:       # unknown field names
                return self._send(400, f"{exc}\n", cache=False)
            if as_json:
                return self._send(200, body, "application/json")
            return self._send(200, body)
        except (BrokenPipeError, ConnectionResetError):
            return None
        except Exception as exc:
            log.exception("status request %s failed", self.path)
            message = " ".join(str(exc).split()) or type(exc).__name__
            try:
                self._send(500, f"error: {type(exc).__name__}: {message}\n", cache=False)
            except OSError:
                pass
