"""statsd output under Nodepool's own metric names, so existing Graphite/Grafana dashboards work.

Configured the way Nodepool is: only from the environment (``STATSD_HOST``, ``STATSD_PORT``,
default 8125); with no ``STATSD_HOST`` every function here is a no-op.  Names follow Nodepool 11
(see docs/metrics.md): dots and colons inside user-derived name parts (requestor, label,
provider, image...) become ``_`` so they cannot split a Graphite path or end a statsd key.

statsd is UDP and fire-and-forget: a failure to send is logged at debug level and never raised
to the caller (a metric must never break a launch or a build).
"""
import logging
import os
import threading
import time

import statsd

from .model.states import NodeState

log = logging.getLogger("nodepool.stats")

_client = None
_client_env = None
_client_lock = threading.Lock()


def client():
    """The process's statsd client, or None when ``STATSD_HOST`` is not set.

    The environment is re-read when it changes (tests point one process at several listeners)."""
    global _client, _client_env
    env = (os.environ.get("STATSD_HOST"), os.environ.get("STATSD_PORT"))
    with _client_lock:
        if env != _client_env:
            _client_env = env
            _client = None
            host, port = env
            if host:
                try:
                    _client = statsd.StatsClient(host, int(port or 8125))
                except (OSError, ValueError) as exc:
                    log.warning("statsd disabled: cannot use %s:%s: %s", host, port, exc)
        return _client


def clean(part):
    """A name part safe inside a dotted statsd key."""
    return str(part).replace(".", "_").replace(":", "_") if part not in (None, "") else "none"


def _send(fill):
    """Run ``fill(pipeline)`` and send it in as few packets as fit."""
    c = client()
    if c is None:
        return
    try:
        pipe = c.pipeline()
        fill(pipe)
        pipe.send()
    except Exception as exc:       # noqa: BLE001 - metrics must never break the caller
        log.debug("statsd send failed: %s", exc)


# -- launches -------------------------------------------------------------------------------------

def launch_result(exc, phase=None):
    """Nodepool's ``<result>`` key for a finished launch attempt (None: ready)."""
    from .errors import (LabelConfigurationError, LaunchTimeout, PermanentCloudError,
                         QuotaError, StoreError)
    if exc is None:
        return "ready"
    if isinstance(exc, QuotaError):
        return "error.quota"
    if isinstance(exc, LaunchTimeout):
        return "error.keyscan" if phase == "scan" else "error.servercreatetimeout"
    if isinstance(exc, StoreError):
        return "error.zksession"
    if isinstance(exc, LabelConfigurationError):
        return "error.nodepool"         # the label cannot work as configured
    if isinstance(exc, PermanentCloudError):
        return "error.status"           # the cloud failed the instance (e.g. status ERROR)
    return "error.unknown"


def launch(provider, az, requestor, result, seconds):
    """One finished launch attempt: counter and timer under every key Nodepool uses."""
    keys = [f"nodepool.launch.{result}",
            f"nodepool.launch.provider.{clean(provider)}.{result}"]
    if az:
        keys.append(f"nodepool.launch.provider.{clean(provider)}.{clean(az)}.{result}")
    if requestor:
        keys.append(f"nodepool.launch.requestor.{clean(requestor)}.{result}")
    ms = max(0.0, seconds) * 1000.0

    def fill(pipe):
        for key in keys:
            pipe.timing(key, ms)
            pipe.incr(key)
    _send(fill)


def leaked(provider, plural, count=1):
    """Leaked resources removed (``instances``, ``volumes``, ``images``...)."""
    _send(lambda p: p.incr(f"nodepool.provider.{clean(provider)}.leaked.{clean(plural)}", count))


def request_wait(label, provider, warm, seconds):
    """A fulfilled request's wait, split warm (served from ready nodes) and cold (launched)."""
    kind = "warm" if warm else "cold"
    ms = max(0.0, seconds) * 1000.0

    def fill(pipe):
        pipe.timing(f"nodepool.request_wait.label.{clean(label)}.{kind}", ms)
        pipe.timing(f"nodepool.request_wait.provider.{clean(provider)}.label.{clean(label)}"
                    f".{kind}", ms)
    _send(fill)


# -- node gauges (the elected launcher) -----------------------------------------------------------

def node_gauge_values(nodes, config):
    """{key: value} of Nodepool's node gauges: every state of every label and provider of the
    config (zeros included, so a state that empties drops to 0), plus ``max_servers``."""
    states = [s.value for s in NodeState]
    labels = set(config.labels) if config else set()
    providers = set(config.providers) if config else set()
    for node in nodes:
        labels.update(node.type or ())
        if node.provider:
            providers.add(node.provider)
    values = {}
    for state in states:
        values[f"nodepool.nodes.{state}"] = 0
        for label in labels:
            values[f"nodepool.label.{clean(label)}.nodes.{state}"] = 0
        for prov in providers:
            values[f"nodepool.provider.{clean(prov)}.nodes.{state}"] = 0
    for node in nodes:
        state = getattr(node.state, "value", node.state)
        if state not in states:
            continue
        values[f"nodepool.nodes.{state}"] += 1
        for label in set(node.type or ()):
            values[f"nodepool.label.{clean(label)}.nodes.{state}"] += 1
        if node.provider:
            values[f"nodepool.provider.{clean(node.provider)}.nodes.{state}"] += 1
    if config:
        for name, prov in config.providers.items():
            total = 0
            for pool in prov.pools.values():
                limit = getattr(pool, "max_servers", None)
                if isinstance(limit, (int, float)) and 0 < limit < float("inf"):
                    total += int(limit)
            values[f"nodepool.provider.{clean(name)}.max_servers"] = total
        for tenant, tl in getattr(config, "tenant_limits", {}).items():
            for limit, value in (getattr(tl, "limits", None) or {}).items():
                if isinstance(value, (int, float)) and value != float("inf"):
                    values[f"nodepool.tenant_limits.{clean(tenant)}.{clean(limit)}"] = value
    return values


def addressable_request_values(requests, components):
    """``nodepool.provider.<prov>.pool.<pool>.addressable_requests``: open requests whose
    labels a registered pool supports."""
    open_reqs = [r for r in requests if getattr(r.state, "value", r.state) in
                 ("requested", "pending")]
    values = {}
    for comp in components:
        if comp.kind != "pool" or not comp.provider_name:
            continue
        supported = set(comp.supported_labels or ())
        values[f"nodepool.provider.{clean(comp.provider_name)}.pool.{clean(comp.name)}"
               f".addressable_requests"] = sum(
                   1 for r in open_reqs if set(r.node_types) <= supported)
    return values


def gauges(values):
    """Send a {key: value} dict of gauges."""
    def fill(pipe):
        for key, value in sorted(values.items()):
            pipe.gauge(key, value)
    _send(fill)


# -- builder --------------------------------------------------------------------------------------

BUILD_IDLE, BUILD_BUILDING, UPLOAD_UPLOADING, PAUSED = 0, 1, 2, 3


def image_build(image, rc, seconds, sizes=None, when=None):
    """A finished diskimage build: ``status.rc``, ``status.duration`` (timer),
    ``status.last_build`` (unix time) and the size of each format in bytes."""
    base = f"nodepool.dib_image_build.{clean(image)}"

    def fill(pipe):
        pipe.gauge(f"{base}.status.rc", int(rc))
        pipe.timing(f"{base}.status.duration", max(0.0, seconds) * 1000.0)
        pipe.gauge(f"{base}.status.last_build", int(when or time.time()))
        for ext, size in (sizes or {}).items():
            pipe.gauge(f"{base}.{clean(ext)}.size", int(size))
    _send(fill)


def image_upload(image, provider, seconds):
    """A successful upload: ``nodepool.image_update.<img>.<prov>`` counter and timer."""
    key = f"nodepool.image_update.{clean(image)}.{clean(provider)}"

    def fill(pipe):
        pipe.timing(key, max(0.0, seconds) * 1000.0)
        pipe.incr(key)
    _send(fill)


def builder_state(hostname, building, uploading, paused_images, paused_uploads,
                  images, uploads, build_requests):
    """The builder's state gauges.

    ``images``: image names this builder builds; ``building``: those building now;
    ``uploads``: (image, provider) pairs; ``uploading``: those uploading now; the ``paused_*``
    sets mark paused ones; ``build_requests``: image names with a pending manual build request."""
    host = clean(hostname)
    values = {}
    for image in images:
        state = (PAUSED if image in paused_images else
                 BUILD_BUILDING if image in building else BUILD_IDLE)
        values[f"nodepool.builder.{host}.image.{clean(image)}.build.state"] = state
        values[f"nodepool.image.{clean(image)}.image_build_requests"] = \
            1 if image in build_requests else 0
    for image, provider in uploads:
        state = (PAUSED if (image, provider) in paused_uploads or image in paused_images else
                 UPLOAD_UPLOADING if (image, provider) in uploading else BUILD_IDLE)
        values[f"nodepool.builder.{host}.image.{clean(image)}.provider.{clean(provider)}"
               f".upload.state"] = state
    values["nodepool.image_build_requests"] = len(build_requests)
    values[f"nodepool.builder.{host}.current_builds"] = len(building)
    values[f"nodepool.builder.{host}.current_uploads"] = len(uploading)
    gauges(values)
    return values


def format_sizes(images_dir, image, build_id, formats):
    """{format: bytes actually allocated (st_blocks * 512)} of a build's files that exist."""
    from .model.images import build_file_path
    sizes = {}
    for fmt in formats or ():
        try:
            st = os.stat(build_file_path(images_dir, image, build_id, fmt))
        except OSError:
            continue
        sizes[fmt] = st.st_blocks * 512
    return sizes


def report_builder(hostname, config, builds, uploads, store):
    """The builder state gauges from the janitor's snapshot of builds and uploads."""
    if client() is None:
        return None
    from .builder.planner import buildable_images
    images = sorted(buildable_images(config))
    building = {b.image for b in builds
                if getattr(b.state, "value", b.state) == "building" and b.builder == hostname}
    uploading = {(u.image, u.provider) for u in uploads
                 if getattr(u.state, "value", u.state) == "uploading"}
    paused = {name for name in images
              if config.diskimages[name].pause or store.is_image_paused(name)}
    requested = {name for name in images if store.get_image_build_request(name) is not None}
    pairs, paused_pairs = [], set()
    for prov_name, prov in config.providers.items():
        if not prov.manages_images:
            continue
        for name, pdimg in prov.diskimages.items():
            if name in images:
                pairs.append((name, prov_name))
                if pdimg.pause:
                    paused_pairs.add((name, prov_name))
    return builder_state(hostname, building, uploading, paused, paused_pairs, images, pairs,
                         requested)
