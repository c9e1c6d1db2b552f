"""What the launcher tells the outside about itself, apart from its records: statsd gauges and
timers under Nodepool's names, the warm/cold wait of every fulfilled request, and its recent
launch failures (see ``nodepool.waits`` for where those two live and why).

The launcher calls ``fulfilled`` when it fulfils a request and ``tick`` once a pass with the
pass's snapshot; nothing here ever raises into the loop or waits on anything.

Node gauges, like Nodepool's, come from one launcher only: the one holding the stats lock,
taken with a non-blocking try (the lock goes with its session, so another launcher takes over
when it dies).  They are sent at most once per ``GAUGE_SECONDS``.
"""
import logging
import time

from .. import metrics, stats, waits
from ..errors import LockError, StoreError
from .minready import is_min_ready

log = logging.getLogger("nodepool.launcher.observer")

GAUGE_SECONDS = 1.0
ELECTION_RETRY_SECONDS = 10.0    # a launcher that is not sending gauges tries this often
STATS_LOCK = "/nodepool/launcher-locks/.statsd-gauges"


class Observer:
    def __init__(self, store, get_config, component, launcher_name, own_pool_ids=None,
                 clock=time.time):
        self.store = store
        self.own_pool_ids = own_pool_ids       # () -> pool component ids of this launcher
        self.get_config = get_config
        self.component = component
        self.launcher_name = launcher_name
        self.clock = clock
        self.waits = waits.Ring(waits.RING_SIZE)
        self.failures = waits.Ring(waits.FAILURE_RING_SIZE)
        self._failed_seen = set()
        self._last_gauges = 0.0
        self._last_flush = 0.0
        self._stats_lock = None
        self._next_election = 0.0

    # -- called by the request handler ----------------------------------------------------------

    def fulfilled(self, request, provider, warm, seconds):
        """A request was fulfilled after ``seconds``; ``warm``: no node was launched for it.
        The launcher's own stock requests (min-ready) are not waits anyone sees: skipped."""
        if is_min_ready(request):
            return
        try:
            kind = "warm" if warm else "cold"
            for w in waits.waits_of_request(request, provider, warm, seconds, self.clock()):
                metrics.REQUEST_WAIT_SECONDS.labels(w.label, provider, kind).observe(w.seconds)
                stats.request_wait(w.label, provider, warm, w.seconds)
                self.waits.add(w.to_row())
        except Exception:       # noqa: BLE001 - observation must never break fulfilment
            log.exception("recording the wait of request %s failed", request.id)

    # -- called once a pass ---------------------------------------------------------------------

    def tick(self, index, requests, components):
        """``index``: the pass's ``NodeIndex`` (only its failed nodes are looked at, and the
        whole fleet only when gauges are due)."""
        try:
            self._note_failures([index.by_id[i] for i in sorted(index.failed)])
            mono = time.monotonic()
            if mono - self._last_gauges >= GAUGE_SECONDS and stats.client() is not None:
                self._last_gauges = mono
                if self._elected():
                    values = stats.node_gauge_values(index.nodes(), self.get_config())
                    values.update(stats.addressable_request_values(requests, components))
                    stats.gauges(values)
            self.flush()
        except StoreError as exc:
            log.warning("launcher observation not written (retried): %s", exc)
        except Exception:       # noqa: BLE001
            log.exception("launcher observation failed (ignored)")

    def _note_failures(self, nodes):
        """Remember each failed launch of ours once (its node is deleted soon after);
        ``nodes``: those with a failure reason."""
        ours = set(self.own_pool_ids()) if self.own_pool_ids else {n.launcher for n in nodes}
        current = set()
        for node in nodes:
            reason = (node.extra or {}).get("failure_reason")
            if not reason:
                continue
            current.add(node.id)
            if node.id in self._failed_seen or node.launcher not in ours:
                continue
            self._failed_seen.add(node.id)
            self.failures.add({
                "time": round(node.state_time or self.clock(), 1), "node": node.id,
                "provider": node.provider, "pool": node.pool,
                "label": node.type[0] if node.type else None,
                "state": getattr(node.state, "value", node.state), "reason": str(reason)[:300]})
        self._failed_seen &= current

    def _elected(self):
        if self._stats_lock is not None and self.store.holds(self._stats_lock):
            return True
        self._stats_lock = None
        mono = time.monotonic()
        if mono < self._next_election:
            return False
        try:
            self._stats_lock = self.store.lock(STATS_LOCK, identifier=self.launcher_name)
        except LockError:
            self._next_election = mono + ELECTION_RETRY_SECONDS
            return False
        log.info("this launcher now sends the statsd node gauges")
        return True

    def flush(self, force=False):
        """Write the rings into our launcher component (at most every FLUSH_SECONDS)."""
        if self.component is None or not (self.waits.dirty or self.failures.dirty):
            return
        mono = time.monotonic()
        if not force and mono - self._last_flush < waits.FLUSH_SECONDS:
            return
        self._last_flush = mono
        self.component.extra[waits.WAITS_KEY] = list(self.waits.rows)
        self.component.extra[waits.FAILURES_KEY] = list(self.failures.rows)
        self.store.update_component(self.component)
        self.waits.dirty = self.failures.dirty = False

    def stop(self):
        try:
            self.flush(force=True)
        except Exception as exc:    # noqa: BLE001
            log.debug("final flush of the wait ring failed: %s", exc)
        if self._stats_lock is not None:
            try:
                self._stats_lock.release()
            except Exception:       # noqa: BLE001
                pass
