"""min-ready: keep a stock of ready unallocated nodes per label.

The launcher asks for stock with ordinary node requests (requestor ``NodePool:min-ready``,
priority 900, ephemeral), so stock is launched, counted and limited exactly like any other
request.  Which labels to ask for and how many is decided here as pure functions; the
``MinReady`` class submits and finishes those requests through the store.

Two rules keep min-ready from spinning when a label cannot be served:

* it asks only for labels some pool could launch now (``servable_labels``): enabled, provider
  up, label not broken, image present, size within the pool's and the cloud's limits; a label
  only other launchers serve is asked for, and they judge;
* a failed min-ready request is kept (and counted as outstanding) for ``FAILED_HOLD`` seconds
  before it is removed and asked again, so a label every pool declines is retried at that pace
  by every launcher, not once a pass.
"""
import logging
import time
from collections import Counter
from dataclasses import dataclass

from ..errors import StoreError
from ..model.records import NodeRequest
from ..model.states import RequestState
from .fanout import Fanout
from .planner import MIN_READY_PRIORITY, MIN_READY_REQUESTOR, is_ready_unallocated, launchable_now

log = logging.getLogger("nodepool.launcher.min-ready")

FAILED_HOLD = 30.0
# states in which a min-ready request counts as stock asked for (fulfilled: its node is still
# allocated to it until it is finished)
ASKED_STATES = (RequestState.REQUESTED, RequestState.PENDING, RequestState.FULFILLED)


@dataclass(frozen=True)
class SubmitMinReady:
    label: str
    count: int


def is_min_ready(request):
    return request.requestor == MIN_READY_REQUESTOR


def min_ready_label(request):
    """The label a min-ready request asks stock of (None: not one label, so not stock)."""
    return request.node_types[0] if len(request.node_types) == 1 else None


def servable_labels(views, components, my_pool_ids):
    """Labels worth asking stock for: a pool of ours could launch one now, or a pool of
    another launcher supports it.  ``my_pool_ids``: our registered pools (those still
    starting have no view yet, and serve nothing yet)."""
    mine = set(my_pool_ids)
    out = set()
    for comp in components:
        if comp.pool_id not in mine:
            out |= set(comp.supported_labels or [])
    for pv in views:
        out |= {label for label in pv.pool.labels if launchable_now(pv, label)}
    return out


def _held_failure(request, now):
    return request.state == RequestState.FAILED and \
        now - (request.state_time or now) < FAILED_HOLD


def ready_counts(nodes):
    """Ready unallocated nodes per label (nodes of one label: stock is launched per label)."""
    ready = Counter()
    for node in nodes:
        if is_ready_unallocated(node) and len(node.type) == 1:
            ready[node.type[0]] += 1
    return ready


def pending_min_ready(requests, now):
    """Label -> outstanding min-ready requests (of any launcher): requested, pending, fulfilled
    (its node is still allocated to it until it is finished) or failed less than
    ``FAILED_HOLD`` ago.  (The launcher keeps the first three counts up to date in its
    ``RequestIndex`` and adds ``held_failures`` of the failed ones.)"""
    pending = Counter()
    for req in requests:
        label = min_ready_label(req) if is_min_ready(req) else None
        if label is not None and req.state in ASKED_STATES:
            pending[label] += 1
    return pending + held_failures(requests, now)


def held_failures(requests, now):
    """Label -> min-ready requests among ``requests`` that failed less than ``FAILED_HOLD``
    ago (they count as outstanding, so a label every pool declines is not asked again at
    once)."""
    held = Counter()
    for req in requests:
        label = min_ready_label(req) if is_min_ready(req) else None
        if label is not None and _held_failure(req, now):
            held[label] += 1
    return held


def plan_min_ready(labels, ready, pending, servable):
    """How many min-ready requests to submit per label.

    ``labels``: config labels; ``ready``: ``ready_counts`` of the nodes; ``pending``:
    ``pending_min_ready``; ``servable``: ``servable_labels``.  Ready unallocated nodes and
    outstanding min-ready requests (of any launcher) both count towards the target, so several
    launchers do not overshoot.
    """
    actions = []
    for name, label in sorted(labels.items()):
        if label.min_ready <= 0 or name not in servable:
            continue
        short = label.min_ready - ready[name] - pending[name]
        if short > 0:
            actions.append(SubmitMinReady(name, short))
    return actions


def min_ready_to_finish(requests, locked_requests, now):
    """Ids of min-ready requests that are done: fulfilled ones at once (their nodes become
    stock), failed ones once ``FAILED_HOLD`` has passed."""
    return [r.id for r in requests
            if is_min_ready(r) and r.id not in locked_requests
            and (r.state == RequestState.FULFILLED
                 or (r.state == RequestState.FAILED and not _held_failure(r, now)))]


class MinReady:
    """Submits stock requests and finishes the done ones (under the request's lock)."""

    def __init__(self, store, deallocate):
        self.store = store
        self.deallocate = deallocate        # (node id, request id, reason) -> None
        self.fanout = Fanout()              # independent finishes of a pass, side by side

    def top_up(self, labels, ready, pending, views, components, my_pool_ids):
        """``pending``: ``pending_min_ready`` of the pass's requests."""
        for action in plan_min_ready(labels, ready, pending,
                                     servable_labels(views, components, my_pool_ids)):
            submitted = 0
            try:
                for _ in range(action.count):
                    req = NodeRequest(node_types=[action.label], requestor=MIN_READY_REQUESTOR,
                                      reuse=False, created_time=time.time())
                    self.store.submit_request(req, priority=MIN_READY_PRIORITY, ephemeral=True)
                    submitted += 1
            except StoreError as exc:
                # the next pass counts what was submitted and asks for the rest
                log.warning("min-ready: requesting label %s failed: %s", action.label, exc)
            if submitted:
                log.info("min-ready: requested %d node(s) of label %s", submitted, action.label)

    def finish_done(self, requests, locked_requests, now):
        """``requests``: the min-ready requests fulfilled or failed (others are skipped)."""
        self.fanout.run(self._finish_quietly, min_ready_to_finish(requests, locked_requests, now))

    def _finish_quietly(self, request_id):
        try:
            self.finish(request_id)
        except StoreError as exc:
            log.warning("min-ready request %s: finishing failed (will retry): %s",
                        request_id, exc)

    def finish(self, request_id):
        with self.store.request_if_free(request_id) as req:
            if req is None:
                return
            if req.state == RequestState.FAILED:
                log.warning("min-ready request %s for %s failed (%s); asking again", req.id,
                            ",".join(req.node_types), _reasons(req))
            for nid in req.nodes:
                self.deallocate(nid, req.id, "min-ready stock")
            self.store.delete_request(req.id)


def _reasons(req):
    reasons = req.extra.get("declined_reasons") or {}
    return "; ".join(sorted(set(reasons.values()))) or "no reason recorded"

