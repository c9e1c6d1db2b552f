"""Prometheus metrics shared by the launcher, the builder and the web app.

Counters and histograms are module-level objects in the default registry so that any part of a
daemon can increment them with one import.  Gauges of current state (nodes per state, requests per
state) are not kept up to date by hand: ``store_collector`` reads them from the store at scrape time,
so they can never drift from the truth.  The web app serves everything at ``/metrics``.
"""
import collections
import time

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Launch durations run from seconds (simulated, static) to many minutes (real clouds).
_LAUNCH_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))
_IMAGE_BUCKETS = (10, 60, 300, 600, 1200, 1800, 3600, 7200, 14400, float("inf"))

LAUNCH_RESULTS = ("ready", "error.quota", "error.timeout", "error.cloud", "error.unknown")

LAUNCHES = Counter(
    "nodepool_launches", "Node launches by outcome (ready or error.<kind>)",
    ["provider", "pool", "label", "result"])
LAUNCH_SECONDS = Histogram(
    "nodepool_launch_seconds", "Time from launch start to ready node",
    ["provider", "label"], buckets=_LAUNCH_BUCKETS)
DELETES = Counter(
    "nodepool_deletes", "Node deletions by outcome", ["provider", "result"])
DELETE_SECONDS = Histogram(
    "nodepool_delete_seconds", "Time to delete a node's cloud resources", ["provider"],
    buckets=_LAUNCH_BUCKETS)
# Keyed by provider only: the label-set of a request is too high-cardinality for a label.
REQUEST_SECONDS = Histogram(
    "nodepool_request_fulfilment_seconds", "Time from request submission to fulfilment",
    ["provider"], buckets=_LAUNCH_BUCKETS)
REQUESTS_HANDLED = Counter(
    "nodepool_requests_handled", "Node requests handled by a pool (fulfilled, declined, failed)",
    ["provider", "pool", "result"])
# Warm waits (served from ready nodes) are sub-second; cold ones last a launch.
_WAIT_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))
REQUEST_WAIT_SECONDS = Histogram(
    "nodepool_request_wait_seconds", "Time from request submission to fulfilment per label; "
    "kind is warm (every node came from the ready pool) or cold (a node was launched for it)",
    ["label", "provider", "kind"], buckets=_WAIT_BUCKETS)
LEAKED = Counter(
    "nodepool_leaked_resources", "Cloud resources found leaked and cleaned up",
    ["provider", "type"])
BACKOFFS = Counter(
    "nodepool_backoffs", "Refusals and failures after which the launcher waits before trying "
    "again (kind: quota, launch-error, delete-error, request-error, store-error)",
    ["provider", "kind"])
API_CALLS = Counter(
    "nodepool_api_calls", "Calls made to a provider's cloud API (retries count again)",
    ["provider", "operation"])
IMAGE_BUILDS = Counter(
    "nodepool_image_builds", "Diskimage builds by outcome", ["image", "result"])
IMAGE_BUILD_SECONDS = Histogram(
    "nodepool_image_build_seconds", "Duration of diskimage builds", ["image"],
    buckets=_IMAGE_BUCKETS)
ROLLOUT_EVENTS = Counter(
    "nodepool_image_rollout_events", "Image rollout events per upload pair (event: validated, "
    "validation-failed, step, current, withdrawn-validation, withdrawn-fallback)",
    ["image", "provider", "event"])
IMAGE_UPLOADS = Counter(
    "nodepool_image_uploads", "Image uploads by outcome", ["image", "provider", "result"])
IMAGE_UPLOAD_SECONDS = Histogram(
    "nodepool_image_upload_seconds", "Duration of image uploads", ["image", "provider"],
    buckets=_IMAGE_BUCKETS)


def _state_name(state):
    return getattr(state, "value", state) or "unknown"


def node_counts(nodes):
    """Count nodes by (provider, label, state); a node with several labels counts for each."""
    counts = collections.Counter()
    for node in nodes:
        labels = node.type or [""]
        for label in labels:
            counts[(node.provider or "", label, _state_name(node.state))] += 1
    return counts


def request_counts(requests):
    """Count requests by state."""
    return collections.Counter(_state_name(r.state) for r in requests)


# request states a client is still waiting in: their oldest request's age is what to alert on
# (a request that never ends shows there first)
WAITING_STATES = ("requested", "pending")


def oldest_waiting(requests, now):
    """Per waiting state, the age in seconds of its oldest request (by ``created_time``)."""
    oldest = {}
    for req in requests:
        state = _state_name(req.state)
        if state in WAITING_STATES and req.created_time is not None:
            oldest[state] = min(oldest.get(state, req.created_time), req.created_time)
    return {state: max(0.0, now - created) for state, created in oldest.items()}


class StoreCollector(Collector):
    """Reads current node and request gauges from the store at each scrape.

    A store that fails is reported as missing gauges (and ``nodepool_store_up 0``), never as a
    failed scrape: the process metrics are still worth having when the store is down.
    """

    def __init__(self, store):
        self.store = store

    def collect(self):
        up = GaugeMetricFamily("nodepool_store_up", "1 if the state store answered this scrape")
        try:
            nodes = self.store.list_nodes(shared=True)   # only counted
            requests = self.store.list_requests(shared=True)
        except Exception:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        node_gauge = GaugeMetricFamily(
            "nodepool_nodes", "Nodes by provider, label and state",
            labels=["provider", "label", "state"])
        for (provider, label, state), count in sorted(node_counts(nodes).items()):
            node_gauge.add_metric([provider, label, state], count)
        yield node_gauge
        request_gauge = GaugeMetricFamily(
            "nodepool_requests", "Node requests by state", labels=["state"])
        for state, count in sorted(request_counts(requests).items()):
            request_gauge.add_metric([state], count)
        yield request_gauge
        age_gauge = GaugeMetricFamily(
            "nodepool_request_oldest_age_seconds",
            "Age of the oldest node request a client still waits for, by state (requested, "
            "pending); 0 when there is none", labels=["state"])
        ages = oldest_waiting(requests, time.time())
        for state in WAITING_STATES:
            age_gauge.add_metric([state], round(ages.get(state, 0.0), 3))
        yield age_gauge

    def describe(self):
        # Empty so that registering does not call collect() (and hit the store) at once.
        return []


def store_collector(store):
    """A prometheus Collector that yields node and request gauges read from ``store``."""
    return StoreCollector(store)
