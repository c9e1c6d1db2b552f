"""The launcher daemon: one loop that applies the decisions of its modules.

Each pass reads a snapshot of the store (nodes, requests, pool registrations, locks) and hands
it to, in order:

* ``requests.RequestHandler`` — new requests routed to a pool (``planner``), and every request
  this launcher holds carried to its end (``lifecycle``);
* ``cleanup.Cleanup`` — used, expired and abandoned nodes deleted, lost requests requeued;
* ``minready.MinReady`` — stock requested per label, finished stock requests removed;
* ``providers.ProviderSet`` — workers and pool registrations kept in step with the config.

Each provider has a ``ProviderWorker`` thread that talks to its cloud (launches, deletes,
quota, zones, leak scans); the loop itself never calls a cloud and never waits for a lock.
The loop sleeps until the store changes (a new request wakes it within milliseconds) or a
second passes, and never starts passes closer together than ``PASS_FLOOR``.

Restart safety: every instance is tagged with its node id and its node record exists before the
instance does; locks belong to the store session.  When a launcher dies, its locks go with its
session, so its pending requests are reset by whoever notices (``ResetLostRequest``), its unlocked
half-built nodes are deleted (``DeleteNode``), and instances whose node record is gone are found
by the leak scan.
"""
import logging
import os
import signal
import socket
import threading
import time
import uuid

from ..config import load_config
from ..errors import ConfigError, StoreError
from ..model.records import Component
from ..store import open_store
from .cleanup import REQUEST_LOCK_MAX_AGE, Cleanup, return_to_pool
from .fanout import Fanout
from .minready import MinReady, held_failures
from .observer import Observer
from .providers import ProviderSet, quietly
from .requests import RequestHandler
from .validation import RolloutManager

log = logging.getLogger("nodepool.launcher")

PASS_FLOOR = 0.01        # seconds between the starts of two passes, at least
LONG_PASS = 0.05         # a pass that took more CPU than this is followed by a pause as long,
MAX_PASS_GAP = 0.5       # up to this (short passes are not slowed down at all)
IDLE_PASS = 5.0          # with nothing changing, a full pass at least this often


class Launcher:
    def __init__(self, config_path, secure_path=None, hostname=None, webapp=True,
                 loop_interval=1.0, cleanup_interval=5.0, leak_interval=60.0,
                 worker_tick=0.05, store=None, lock_gc_interval=60.0,
                 request_lock_max_age=REQUEST_LOCK_MAX_AGE):
        self.config_path = config_path
        self.secure_path = secure_path
        self.hostname = hostname or socket.getfqdn()
        self.launcher_name = f"{self.hostname}-{uuid.uuid4().hex[:8]}"
        self.want_webapp = webapp
        self.loop_interval = loop_interval
        self.cleanup_interval = cleanup_interval
        self.leak_interval = leak_interval
        self.worker_tick = worker_tick
        self.lock_gc_interval = lock_gc_interval
        self.request_lock_max_age = request_lock_max_age
        self.config = None
        self._config_mtimes = None
        self.store = store
        self._own_store = store is None
        self.providers = None
        self.requests = None
        self.cleanup = None
        self.min_ready = None
        self.rollout = None
        self.observer = None
        self.launcher_component = None
        self.paused_pools = set()
        self.webapp = None
        self.ready = False
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._last_cleanup = 0.0
        self._last_pass = 0.0
        self._session_lost = threading.Event()
        self.watcher = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self):
        self.config = load_config(self.config_path, self.secure_path)
        self._config_mtimes = self._mtimes()
        if self.store is None:
            self.store = open_store(self.config)
            self.store.start()
        self.store.add_session_listener(self._on_session)
        self.watcher = self.store.watch()
        self.launcher_component = self.store.register_component(Component(
            kind="launcher", hostname=self.hostname, state="running",
            version_string=_version()))
        self.rollout = RolloutManager(self.store, lambda: self.config, self.launcher_name)
        self.providers = ProviderSet(
            self.store, self.hostname, self.launcher_name, _version(),
            dict(tick=self.worker_tick, leak_interval=self.leak_interval,
                 on_outcome=self.rollout.record), self._wake)
        self.requests = RequestHandler(self.store, self.providers, lambda: self.config,
                                       self.launcher_name)
        self.index = self.requests.index
        self.request_index = self.requests.request_index
        self.requests.choose_upload = self.rollout.choose
        self.cleanup = Cleanup(self.store, self.providers, lambda: self.config,
                               lambda: set(self.requests.held), self.lock_gc_interval,
                               self.request_lock_max_age)
        self.cleanup.on_returned = self.rollout.returned
        self.min_ready = MinReady(
            self.store, lambda nid, rid, why: return_to_pool(self.store, nid, rid, why))
        self.fanout = Fanout.for_store(self.store)
        self.requests.fanout = self.cleanup.fanout = self.min_ready.fanout = self.fanout
        self.observer = Observer(
            self.store, lambda: self.config, self.launcher_component, self.launcher_name,
            lambda: [c.pool_id for c in self.providers.components.values()])
        self.requests.on_fulfil = self.observer.fulfilled
        self.providers.sync(self.config)
        if self.want_webapp:
            self._start_webapp()
        log.info("launcher %s started with %d provider(s) on %s", self.launcher_name,
                 len(self.workers), type(self.store).__name__)

    @property
    def workers(self):
        return self.providers.workers if self.providers else {}

    @property
    def active(self):
        """Requests this launcher holds (id -> lifecycle.Held)."""
        return self.requests.held if self.requests else {}

    def _start_webapp(self):
        try:
            from ..web.app import StatusWebApp
        except ImportError:
            log.warning("web app not available")
            return
        web = self.config.webapp
        self.webapp = StatusWebApp(self.store, lambda: self.config, web.port, web.listen_address)
        try:
            self.webapp.start()
        except OSError as exc:
            log.error("status web app cannot listen on %s:%s: %s", web.listen_address,
                      web.port, exc)
            self.webapp = None

    def stop(self):
        self._stop.set()
        if self.watcher:
            self.watcher.notify()

    def shutdown(self):
        """Stop workers, release our locks and registrations.  In-flight launches are left to
        the restart-safety rules (their unlocked nodes get deleted, instances are tagged)."""
        if getattr(self, "fanout", None) is not None:
            self.fanout.stop()
        if self.providers is not None:
            self.providers.stop()
        if self.webapp:
            self.webapp.stop()
        if self.rollout is not None:
            self.rollout.stop()
        if self.observer is not None:
            self.observer.stop()
        if self.store is not None:
            if self.launcher_component:
                quietly(self.store.unregister_component, self.launcher_component)
            if self.requests is not None:
                self.requests.release_all()
            if self._own_store:
                self.store.stop()
        log.info("launcher %s stopped", self.launcher_name)

    def install_signal_handlers(self):
        """SIGTERM/SIGINT stop, SIGHUP reloads.  Call from the main thread before ``start()``
        so a signal during start-up is not lost."""
        signal.signal(signal.SIGTERM, lambda *a: self.stop())
        signal.signal(signal.SIGINT, lambda *a: self.stop())
        signal.signal(signal.SIGHUP, lambda *a: self._reload.set())

    def run(self):
        """Run until ``stop()``, then shut down.  A pass runs when the store changed, or when
        something is due by time alone (cleanup, a backoff running out, the config file);
        an idle launcher with a large fleet does not re-plan it every second."""
        changed = True
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                cpu_started = time.thread_time()
                if changed or self._due(started):
                    self._last_pass = started
                    try:
                        self.run_once()
                    except StoreError as exc:
                        log.error("state store error (will retry): %s", exc)
                        self._stop.wait(1)
                    except Exception:
                        log.exception("launcher loop failed (will retry)")
                        self._stop.wait(1)
                    self.ready = True
                    if self.webapp:
                        self.webapp.ready = True
                took = time.thread_time() - cpu_started
                changed = self.watcher.wait(0.25 if self.providers.busy() else self.loop_interval)
                # a pass that wakes itself (its own writes are changes too) must not spin, and
                # a busy launcher with a large fleet must not spend every moment computing: after
                # a long pass the next starts no sooner than the CPU time this one took (time
                # spent waiting on the store or a lock does not count)
                gap = min(took, MAX_PASS_GAP) if took > LONG_PASS else 0.0
                rest = max(PASS_FLOOR, gap) - (time.monotonic() - started)
                if rest > 0:
                    self._stop.wait(rest)
        finally:
            self.shutdown()

    def _due(self, now):
        """Whether a pass is needed although the store did not change."""
        return (now - self._last_pass >= IDLE_PASS
                or now - self._last_cleanup >= self.cleanup_interval
                or self._session_lost.is_set() or self._reload.is_set()
                or self._mtimes() != self._config_mtimes
                or self.requests.waiting_on_time())

    def _wake(self):
        if self.watcher is not None:
            self.watcher.notify()

    def _on_session(self, state):
        if state == "lost":
            self._session_lost.set()
            if self.watcher:
                self.watcher.notify()

    # -- one pass ----------------------------------------------------------------------------------

    def run_once(self):
        """One pass: requests first (new ones routed, held ones moved on), then housekeeping,
        all decided from one snapshot of the store (records shared with its cache, not
        copied: every decision only reads them, and writes go through fresh reads)."""
        if self._session_lost.is_set():
            self._handle_session_lost()
        self._maybe_reload()
        now = time.monotonic()
        self.requests.note_launches()
        index = self.index.refresh(self.store)
        requests = self.request_index.refresh(self.store)
        components = self.store.list_components("pool")
        locked_nodes = self.store.locked_node_ids()
        views = self.providers.views(index)
        self.requests.views = {v.key: v for v in views}
        self.requests.components = components
        self.requests.progress(index, requests, now)
        paused = self.requests.route(
            requests, index, views, components, locked_nodes,
            {t: tl.limits for t, tl in self.config.tenant_limits.items()}, now)
        self.providers.set_paused(paused)
        self.paused_pools = paused
        self.observer.tick(index, requests, components)
        self.housekeeping_once(index, requests, locked_nodes, views, components)

    def housekeeping_once(self, index, requests, locked_nodes, views, components):
        """Returned nodes, finished min-ready requests, periodic cleanup and new min-ready
        requests: after the requests of the pass, so a new request never waits behind them.
        The pass's snapshot is used (``requests``: its ``RequestIndex``): what the request
        handling changed is seen next pass (every action here re-checks under its lock, and
        min-ready counts outstanding requests, so an older view never asks for too much)."""
        mono = time.monotonic()
        if mono - self._last_cleanup >= self.cleanup_interval:
            self._last_cleanup = mono
            aged = {name for name, label in self.config.labels.items() if label.max_ready_age}
            self.cleanup.run(index.cleanup_candidates(aged), requests, locked_nodes,
                             self.store.locked_request_ids(), time.time())
        else:
            self.cleanup.delete_used(index, locked_nodes)
        # locks are not listed here: taking a finished request's lock tells who holds it
        now = time.time()
        self.min_ready.finish_done(requests.min_ready_finished(), (), now)
        # the fleet tallies are the pass's snapshot's (brought up to date when routing)
        pending = requests.min_ready_asked + held_failures(requests.failed_min_ready(), now)
        self.min_ready.top_up(self.config.labels, self.requests.fleet.ready, pending, views,
                              components,
                              [c.pool_id for c in self.providers.components.values()])
        # image rollout: outcome counters, steps, validations (every few seconds)
        self.rollout.run(requests, index.by_id.values())

    # -- config and providers ----------------------------------------------------------------------

    def _mtimes(self):
        out = []
        for path in (self.config_path, self.secure_path):
            try:
                out.append(os.stat(path).st_mtime_ns if path else None)
            except OSError:
                out.append(None)
        return out

    def _maybe_reload(self):
        if not self._reload.is_set() and self._mtimes() == self._config_mtimes:
            return
        self._reload.clear()
        self._config_mtimes = self._mtimes()
        try:
            new = load_config(self.config_path, self.secure_path)
        except ConfigError as exc:
            log.error("configuration not reloaded, keeping the running one:\n%s", exc)
            return
        log.info("configuration reloaded from %s", self.config_path)
        self.config = new
        self.providers.sync(new)

    def _handle_session_lost(self):
        """The lost session's locks are gone: the requests and jobs that held them are let go
        (work begun since under the new session carries on)."""
        self._session_lost.clear()
        count = self.requests.session_lost()
        log.error("state store session lost: %d held request(s) lost their lock and are let go",
                  count)
        self.providers.session_lost()



def _version():
    from .. import __version__
    return __version__
