"""The launcher daemon: applies the planner's decisions through the store and the drivers.

One loop thread does everything that needs a consistent view: reload the config, register
components, take a snapshot of the store, ask ``planner`` what to do, apply it, and finish the
requests whose nodes are done.  Each provider has a ``ProviderWorker`` thread that advances its
launches and deletes.  The loop sleeps until the store changes (a new request wakes it within
milliseconds) or a second passes.

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
from dataclasses import dataclass, field

from ..config import load_config
from ..errors import ConfigError, LockError, NotFoundError, StoreError
from ..model.records import Component, Node, NodeRequest
from ..model.states import NodeState, RequestState
from ..store import open_store
from . import planner
from .provider_worker import ProviderWorker, build_launch_spec, choose_az

try:
    from .. import metrics
except ImportError:  # pragma: no cover
    metrics = None

log = logging.getLogger("nodepool.launcher")

INIT_GRACE = 60          # an unlocked ``init`` node younger than this is being created
UPLOADS_TTL = 2.0
REQUEST_LOCK_MAX_AGE = 8 * 3600   # Nodepool's age for removing a gone request's lock directory


@dataclass
class ActiveRequest:
    """A request this launcher accepted and is launching nodes for."""
    request_id: str
    pool_key: str
    pool_id: str
    lock: object
    slots: list                         # [(label, node_id or None)] in node_types order
    node_locks: dict = field(default_factory=dict)   # node id -> Lock
    waiting: list = field(default_factory=list)      # slots to relaunch after quota aborts
    az: object = None                                # the node set's availability zone
    orphan: bool = False                             # the requestor went away
    started: float = field(default_factory=time.monotonic)


class Launcher:
    def __init__(self, config_path, secure_path=None, hostname=None, webapp=True,
                 loop_interval=1.0, cleanup_interval=1.0, leak_interval=60.0,
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
        self.workers = {}               # provider name -> ProviderWorker
        self.retired = []               # workers finishing their in-flight work
        self.pool_components = {}       # pool key -> Component
        self.launcher_component = None
        self.active = {}                # request id -> ActiveRequest
        self.paused_pools = set()
        self.webapp = None
        self.ready = False
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._last_cleanup = 0.0
        self._last_lock_gc = 0.0
        self._session_lost = threading.Event()
        self.watcher = None
        self._uploads_cache = None

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
        self._sync_providers()
        if self.want_webapp:
            self._start_webapp()
        log.info("launcher %s started with %d provider(s) on %s", self.launcher_name,
                 len(self.workers), type(self.store).__name__)

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
        for worker in list(self.workers.values()) + self.retired:
            worker.stop()
        for worker in list(self.workers.values()) + self.retired:
            worker.join(10)
        if self.webapp:
            self.webapp.stop()
        if self.store is not None:
            for comp in self.pool_components.values():
                _quiet(self.store.unregister_component, comp)
            if self.launcher_component:
                _quiet(self.store.unregister_component, self.launcher_component)
            for ar in self.active.values():
                for lock in ar.node_locks.values():
                    _quiet(lock.release)
                _quiet(ar.lock.release)
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
        """Run until ``stop()``, then shut down."""
        try:
            while not self._stop.is_set():
                try:
                    self.run_once()
                except StoreError as exc:
                    log.error("state store error (will retry): %s", exc)
                    time.sleep(1)
                except Exception:
                    log.exception("launcher loop failed (will retry)")
                    time.sleep(1)
                self.ready = True
                if self.webapp:
                    self.webapp.ready = True
                busy = any(w.busy for w in self.workers.values())
                self.watcher.wait(0.25 if busy else self.loop_interval)
        finally:
            self.shutdown()

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
        """One pass of the request loop: finish or fail the requests we handle, then decide and
        apply what every waiting request gets."""
        if self._session_lost.is_set():
            self._handle_session_lost()
        self._maybe_reload()
        nodes = self.store.list_nodes()
        requests = self.store.list_requests()
        components = self.store.list_components("pool")
        locked_nodes = self.store.locked_node_ids()
        self._progress_active(nodes, requests, components)
        views = self._pool_views(nodes)
        snap = planner.Snapshot(
            requests=requests, nodes=nodes, pools=views,
            registered_pools=components, locked_nodes=locked_nodes,
            active_requests=set(self.active),
            tenant_limits={t: tl.limits for t, tl in self.config.tenant_limits.items()})
        paused = set()
        for action in planner.plan_requests(snap):
            if isinstance(action, planner.Decline):
                self._decline(action, components)
            elif isinstance(action, planner.FailRequest):
                self._fail_declined(action, components)
            elif isinstance(action, planner.Accept):
                self._accept(action, views)
            elif isinstance(action, planner.Defer) and action.pauses:
                paused.add(action.pool_key)
        paused |= {ar.pool_key for ar in self.active.values() if ar.waiting}
        self._update_pool_components(paused)
        self.housekeeping_once()

    def housekeeping_once(self):
        """Returned nodes, finished min-ready requests, periodic cleanup and new min-ready
        requests: after the requests of the pass, so a new request never waits behind them."""
        nodes = self.store.list_nodes()
        requests = self.store.list_requests()
        locked_nodes = self.store.locked_node_ids()
        mono = time.monotonic()
        if mono - self._last_cleanup >= self.cleanup_interval:
            self._last_cleanup = mono
            self._cleanup(nodes, requests, locked_nodes, time.time())
        else:
            self._finish_min_ready(requests)
            self._delete_used(nodes, locked_nodes)
        nodes = self.store.list_nodes()
        self._min_ready(nodes, self.store.list_requests(), self.store.list_components("pool"),
                        self._pool_views(nodes))

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
        self._sync_providers()

    def _sync_providers(self):
        """Start workers for new/changed providers; retire those removed or changed."""
        for name, worker in list(self.workers.items()):
            prov = self.config.providers.get(name)
            if prov is None or prov.raw != worker.provider.raw:
                log.info("provider %s %s: finishing its in-flight work", name,
                         "removed" if prov is None else "changed")
                worker.retire()
                self.retired.append(worker)
                del self.workers[name]
        for name, prov in self.config.providers.items():
            if name not in self.workers:
                try:
                    worker = ProviderWorker(prov, self.store, self.launcher_name,
                                            tick=self.worker_tick,
                                            leak_interval=self.leak_interval,
                                            on_change=self._wake)
                except Exception as exc:
                    log.error("provider %s cannot be used: %s", name, exc)
                    continue
                worker.start()
                self.workers[name] = worker
        self.retired = [w for w in self.retired if w.thread.is_alive()]
        wanted = {pool.key: pool for pool in self.config.pools()
                  if pool.provider in self.workers}
        for key in list(self.pool_components):
            if key not in wanted:
                _quiet(self.store.unregister_component, self.pool_components.pop(key))
        for key, pool in wanted.items():
            comp = self.pool_components.get(key)
            labels = sorted(pool.labels)
            if comp is None:
                comp = Component(
                    kind="pool", hostname=self.hostname, state="running",
                    version_string=_version(), name=pool.name, provider_name=pool.provider,
                    supported_labels=labels, priority=pool.priority, paused=False,
                    pool_id=f"{self.hostname}-PoolWorker.{pool.provider}-{pool.name}-"
                            f"{uuid.uuid4().hex}")
                self.pool_components[key] = self.store.register_component(comp)
            elif comp.supported_labels != labels or comp.priority != pool.priority:
                comp.supported_labels = labels
                comp.priority = pool.priority
                self.store.update_component(comp)

    def _update_pool_components(self, paused):
        for key, comp in self.pool_components.items():
            want = key in paused
            if comp.paused != want:
                comp.paused = want
                _quiet(self.store.update_component, comp)
        self.paused_pools = paused

    def _pool(self, key):
        provider, pool = key.split("/", 1)
        prov = self.config.providers.get(provider)
        return prov.pools.get(pool) if prov else None

    def _uploads(self):
        """Upload records, reread at most every ``UPLOADS_TTL`` seconds: images change rarely and
        listing them walks the whole image tree of the store."""
        now = time.monotonic()
        if self._uploads_cache is None or now - self._uploads_cache[0] > UPLOADS_TTL:
            self._uploads_cache = (now, self.store.list_uploads())
        return self._uploads_cache[1]

    def _pool_views(self, nodes):
        views = []
        uploads = None
        for key, comp in list(self.pool_components.items()):
            pool = self._pool(key)
            worker = self.workers.get(pool.provider) if pool else None
            if worker is None:
                continue
            prov = worker.provider
            unavailable = {}
            for label in pool.labels.values():
                if label.diskimage:
                    if uploads is None:
                        uploads = self._uploads()
                    if _newest_ready_upload(uploads, label.diskimage, prov.name) is None:
                        unavailable[label.name] = (f"no ready upload of diskimage "
                                                   f"{label.diskimage} to {prov.name}")
                elif label.cloud_image and worker.cloud_image_ready.get(label.name) is False:
                    unavailable[label.name] = f"cloud image {label.cloud_image} not found"
            if not worker.started:
                if not worker.start_error:
                    continue          # still starting: neither take nor decline requests yet
                for label in pool.labels:
                    unavailable[label] = f"provider {prov.name} is not available" + (
                        f": {worker.start_error}" if worker.start_error else "")
            views.append(planner.PoolView(
                pool=pool, pool_id=comp.pool_id, label_costs=worker.label_costs,
                broken_labels=worker.broken_labels, unavailable_labels=unavailable,
                cloud_limits=worker.quota_limits if worker.quota_limits else None,
                unmanaged_usage=worker.unmanaged_usage(nodes),
                ignore_provider_quota=pool.ignore_provider_quota,
                max_concurrency=prov.max_concurrency, in_flight=worker.in_flight,
                launches=getattr(worker.adapter, "launches", True),
                slot_labels=worker.slot_labels.get(pool.name)))
        return views

    # -- requests ----------------------------------------------------------------------------------

    def _image_appeared(self, action):
        """Whether a decline for a missing image was based on a stale view: the availability
        snapshot is refreshed only every few seconds, a decline is forever, so re-read first."""
        if not action.reason.startswith("image for label"):
            return False
        key = next((k for k, c in self.pool_components.items() if c.pool_id == action.pool_id),
                   None)
        pool = self._pool(key) if key else None
        if pool is None:
            return False
        self._uploads_cache = None
        uploads = self._uploads()
        for label in pool.labels.values():
            if label.diskimage and f"label {label.name} not" in action.reason and _newest_ready_upload(
                    uploads, label.diskimage, pool.provider) is not None:
                return True
        return False

    def _decline(self, action, components):
        if self._image_appeared(action):
            return
        try:
            lock = self.store.lock_request(action.request_id)
        except LockError:
            return
        with lock:
            req = self.store.get_request(action.request_id)
            if req is None or req.state != RequestState.REQUESTED \
                    or action.pool_id in req.declined_by:
                return
            self._record_decline(req, action.pool_id, action.reason, components)

    def _fail_declined(self, action, components):
        """Every pool still registered has declined it (the others went away): it failed."""
        try:
            lock = self.store.lock_request(action.request_id)
        except LockError:
            return
        with lock:
            req = self.store.get_request(action.request_id)
            if req is None or req.state != RequestState.REQUESTED or not planner.request_failed(
                    req, [c.pool_id for c in components]):
                return
            req.set_state(RequestState.FAILED)
            self.store.update_request(req)
            log.warning("request %s for %s failed: every registered pool has declined it",
                        req.id, ",".join(req.node_types))

    def _record_decline(self, req, pool_id, reason, components=None):
        if components is None:
            components = self.store.list_components("pool")
        req.declined_by.append(pool_id)
        req.extra.setdefault("declined_reasons", {})[pool_id] = reason
        registered = [c.pool_id for c in components]
        if planner.request_failed(req, registered):
            req.set_state(RequestState.FAILED)
            log.warning("request %s for %s failed: every pool declined it (last: %s)",
                        req.id, ",".join(req.node_types), reason)
            _count("REQUESTS_HANDLED", "", "", "failed")
        else:
            req.set_state(RequestState.REQUESTED)
            log.info("request %s declined by %s: %s", req.id, pool_id, reason)
        self.store.update_request(req)

    def _accept(self, action, views):
        view = next(v for v in views if v.key == action.pool_key)
        pool = view.pool
        worker = self.workers[pool.provider]
        try:
            rlock = self.store.lock_request(action.request_id)
        except LockError:
            return
        taken = {}
        req = None
        try:
            req = self.store.get_request(action.request_id)
            if req is None or req.state != RequestState.REQUESTED \
                    or view.pool_id in req.declined_by:
                rlock.release()
                return
            for label, node_id in action.assign:
                try:
                    nlock = self.store.lock_node(node_id)
                except LockError:
                    raise _Retry()
                taken[node_id] = nlock
                node = self.store.get_node(node_id)
                if node is None or node.state != NodeState.READY or node.allocated_to \
                        or label not in node.type:
                    raise _Retry()
                node.allocated_to = req.id
                node.tenant_name = req.tenant_name
                node.requestor = req.requestor
                self.store.update_node(node)
            slots = []
            assigned_iter = list(action.assign)
            for label in req.node_types:
                match = next((a for a in assigned_iter if a[0] == label), None)
                if match is not None:
                    assigned_iter.remove(match)
                    slots.append((label, match[1]))
                else:
                    slots.append((label, None))
            ar = ActiveRequest(req.id, pool.key, view.pool_id, rlock, slots, dict(taken))
            if not action.launch:
                self._fulfil(ar, req)
                return
            with self._pool_lock(pool):
                # other launchers may have filled the pool since our snapshot
                self.store.sync_nodes()
                if not planner.fits_now(view, action.launch, self.store.list_nodes()):
                    raise _Retry()
                req.set_state(RequestState.PENDING)
                self.store.update_request(req)
                self.active[req.id] = ar
                ar.az = self._set_az(ar, worker, pool)
                for i, (label, node_id) in enumerate(ar.slots):
                    if node_id is None:
                        self._launch(ar, i, label, req, pool, worker)
            log.info("request %s accepted by %s: %d ready node(s) assigned, %d launching",
                     req.id, pool.key, len(action.assign), len(action.launch))
        except _Retry:
            # ready nodes already assigned go back to the pool: the request is still waiting
            self._release_nodes(taken, req.id)
            rlock.release()
        except NotFoundError:
            # the requestor went away while we were accepting
            self._release_nodes(taken, req.id if req else action.request_id)
            _quiet(rlock.release)
            self.active.pop(action.request_id, None)

    def _pool_lock(self, pool):
        """Serialises launch decisions for one pool across launchers (held for milliseconds)."""
        try:
            return self.store.lock(f"/nodepool/launcher-locks/{pool.provider}/{pool.name}",
                                   blocking=True, timeout=30, identifier=self.launcher_name)
        except LockError:
            raise _Retry()

    def _set_az(self, ar, worker, pool):
        for _, node_id in ar.slots:
            if node_id:
                node = self.store.get_node(node_id)
                if node and node.az:
                    return node.az
        try:
            return choose_az(pool, worker.adapter.availability_zones())
        except Exception:
            return choose_az(pool, [])

    def _launch(self, ar, slot, label_name, req, pool, worker):
        """Create the node record (so the instance can never leak), lock it, start the launch."""
        prov = worker.provider
        plabel = pool.labels[label_name]
        image_ext_id, image_id, access = None, None, None
        if plabel.diskimage:
            upload = _newest_ready_upload(self.store.list_uploads(image=plabel.diskimage,
                                                                  provider=prov.name),
                                          plabel.diskimage, prov.name)
            if upload is not None:
                image_ext_id, image_id = upload.external_id, upload.path
            dimg = self.config.diskimages.get(plabel.diskimage)
            pdimg = prov.diskimages.get(plabel.diskimage)
            access = (dimg.username if dimg else "zuul", dimg.python_path if dimg else None,
                      dimg.shell_type if dimg else None,
                      pdimg.connection_type if pdimg else "ssh",
                      pdimg.connection_port if pdimg else 22)
        else:
            cimg = prov.cloud_images.get(plabel.cloud_image) if plabel.cloud_image else None
            image_id = plabel.cloud_image
            if cimg:
                access = (cimg.username, cimg.python_path, cimg.shell_type,
                          cimg.connection_type, cimg.connection_port)
        node = Node(state=NodeState.INIT, provider=prov.name, pool=pool.name, type=[label_name],
                    launcher=ar.pool_id, allocated_to=req.id, tenant_name=req.tenant_name,
                    requestor=req.requestor, attributes=pool.node_attributes, az=ar.az,
                    image_id=image_id, cloud=prov.name,
                    resources=dict(worker.label_costs.get(label_name) or {"instances": 1}))
        if access:
            (node.username, node.python_path, node.shell_type, node.connection_type,
             node.connection_port) = access
        node = self.store.create_node(node)
        node.hostname = f"np{node.id}"
        nlock = self.store.lock_node(node.id)
        node.set_state(NodeState.BUILDING)
        self.store.update_node(node)
        ar.slots[slot] = (label_name, node.id)
        ar.node_locks[node.id] = nlock
        spec = build_launch_spec(node, pool, plabel, self.launcher_name, image_ext_id, req)
        worker.submit_launch(node, nlock, spec, pool)

    def _progress_active(self, nodes, requests, components):
        """Fulfil, decline or relaunch the requests this launcher is handling."""
        by_id = {n.id: n for n in nodes}
        live = {r.id: r for r in requests}
        for rid, ar in list(self.active.items()):
            req = live.get(rid)
            if req is None:
                self._orphaned(ar, by_id)
                continue
            states = [by_id[nid].state if nid in by_id else None for _, nid in ar.slots]
            pool = self._pool(ar.pool_key)
            worker = self.workers.get(pool.provider) if pool else None
            # quota aborts: drop the aborted node, relaunch that slot when quota allows
            for i, (label, nid) in enumerate(ar.slots):
                node = by_id.get(nid)
                if node is not None and node.state == NodeState.ABORTED:
                    lock = ar.node_locks.pop(nid, None)
                    if lock:
                        lock.release()    # cleanup deletes the aborted node
                    ar.slots[i] = (label, None)
                    ar.waiting.append(i)
            if ar.waiting and worker is not None and pool is not None:
                self._relaunch_waiting(ar, req, pool, worker, nodes)
                continue
            if any(s is None for _, s in ar.slots):
                continue
            if any(st in (NodeState.FAILED, None) for st in states):
                failed = [by_id[nid] for _, nid in ar.slots
                          if nid in by_id and by_id[nid].state == NodeState.FAILED]
                reason = (failed[0].extra.get("failure_reason", "node launch failed")
                          if failed else "a node vanished")
                self._fail_active(ar, req, reason, components)
            elif all(st == NodeState.READY for st in states):
                self._fulfil(ar, req)

    def _relaunch_waiting(self, ar, req, pool, worker, nodes):
        """Relaunch slots whose launch the cloud refused for quota, as room appears."""
        view = next((v for v in self._pool_views(nodes) if v.key == pool.key), None)
        if view is None:
            return
        try:
            plock = self._pool_lock(pool)
        except _Retry:
            return
        with plock:
            self.store.sync_nodes()
            while ar.waiting:
                slot = ar.waiting[0]
                label = ar.slots[slot][0]
                # each launch stores its node record, so the next check counts it
                if not planner.fits_now(view, [label], self.store.list_nodes()):
                    return
                ar.waiting.pop(0)
                self._launch(ar, slot, label, req, pool, worker)

    def _fulfil(self, ar, req):
        req.nodes = [nid for _, nid in ar.slots]
        req.set_state(RequestState.FULFILLED)
        try:
            self.store.update_request(req)
        except NotFoundError:
            self._orphaned(ar, {})
            return
        for lock in ar.node_locks.values():
            lock.release()
        ar.lock.release()
        self.active.pop(ar.request_id, None)
        waited = time.time() - (req.created_time or time.time())
        provider = ar.pool_key.split("/", 1)[0]
        _count("REQUESTS_HANDLED", provider, ar.pool_key.split("/", 1)[1], "fulfilled")
        _observe("REQUEST_SECONDS", waited, provider)
        log.info("request %s fulfilled by %s with node(s) %s", req.id, ar.pool_key,
                 ",".join(req.nodes))

    def _fail_active(self, ar, req, reason, components):
        """A node failed for good: give back the ready ones, decline the request."""
        for _, nid in ar.slots:
            node = self.store.get_node(nid) if nid else None
            if node is not None and node.state == NodeState.READY:
                node.allocated_to = None
                _quiet(self.store.update_node, node)
        for lock in ar.node_locks.values():
            lock.release()
        req.nodes = []
        try:
            self._record_decline(req, ar.pool_id, reason, components)
        except NotFoundError:
            pass
        ar.lock.release()
        self.active.pop(ar.request_id, None)

    def _orphaned(self, ar, by_id):
        """The requestor went away: ready nodes return to the pool, launches finish as stock."""
        remaining = {}
        for _, nid in ar.slots:
            if nid is None:
                continue
            node = by_id.get(nid) or self.store.get_node(nid)
            lock = ar.node_locks.get(nid)
            if node is not None and node.state in (NodeState.BUILDING, NodeState.INIT):
                remaining[nid] = lock
                continue
            if node is not None and node.state == NodeState.READY and node.allocated_to == ar.request_id:
                node.allocated_to = None
                _quiet(self.store.update_node, node)
            if lock:
                lock.release()
        if remaining:
            # keep watching the launches; when they end they become unallocated stock
            ar.node_locks = remaining
            ar.slots = [(lbl, nid) for lbl, nid in ar.slots if nid in remaining]
            ar.waiting = []
            ar.orphan = True
            return
        _quiet(ar.lock.release)
        self.active.pop(ar.request_id, None)
        log.info("request %s went away; its nodes were returned to the pool", ar.request_id)

    def _release_nodes(self, locks, request_id):
        for nid, lock in locks.items():
            node = self.store.get_node(nid)
            if node is not None and node.allocated_to == request_id:
                node.allocated_to = None
                _quiet(self.store.update_node, node)
            lock.release()

    # -- min-ready ---------------------------------------------------------------------------------

    def _min_ready(self, nodes, requests, components, views):
        servable = set()
        for comp in components:
            servable |= set(comp.supported_labels or [])
        for view in views:
            # labels this launcher serves only with missing images would churn, and labels only
            # pools that never launch (static hosts) serve are ready by registration already
            for label in list(view.unavailable_labels) + list(view.pool.labels):
                if all(label in v.unavailable_labels or label not in v.pool.labels
                       or not v.launches for v in views):
                    servable.discard(label)
        for action in planner.plan_min_ready(self.config.labels, nodes, requests, servable):
            for _ in range(action.count):
                req = NodeRequest(node_types=[action.label], requestor=planner.MIN_READY_REQUESTOR,
                                  reuse=False, created_time=time.time())
                self.store.submit_request(req, priority=planner.MIN_READY_PRIORITY,
                                          ephemeral=True)
            log.info("min-ready: requested %d node(s) of label %s", action.count, action.label)

    def _finish_min_ready(self, requests):
        for req in requests:
            if req.requestor == planner.MIN_READY_REQUESTOR and req.state in (
                    RequestState.FULFILLED, RequestState.FAILED):
                self._apply_finish_min_ready(req.id)

    def _apply_finish_min_ready(self, request_id):
        try:
            lock = self.store.lock_request(request_id)
        except LockError:
            return
        with lock:
            req = self.store.get_request(request_id)
            if req is None:
                return
            for nid in req.nodes:
                self._deallocate(nid, req.id, "min-ready stock")
            self.store.delete_request(req.id)

    # -- cleanup -----------------------------------------------------------------------------------

    def _cleanup(self, nodes, requests, locked_nodes, now):
        locked_requests = self.store.locked_request_ids()
        mine = set(self.workers)
        reusable = {name for name, w in list(self.workers.items())
                    if getattr(w.adapter, "reuses_nodes", False)}
        actions = planner.plan_node_cleanup(
            nodes, requests, locked_nodes, locked_requests, self.config.labels, mine,
            self.config.max_hold_age, now, reusable)
        by_id = {n.id: n for n in nodes}
        for action in actions:
            if isinstance(action, planner.DeleteNode):
                node = by_id[action.node_id]
                if node.state == NodeState.INIT and now - (node.state_time or now) < INIT_GRACE:
                    continue
                self._delete_node(action.node_id, action.reason)
            elif isinstance(action, planner.Deallocate):
                node = by_id[action.node_id]
                self._deallocate(node.id, node.allocated_to, action.reason,
                                 only_if_request_gone=True)
            elif isinstance(action, planner.ResetLostRequest):
                if action.request_id not in self.active:
                    self._reset_lost(action.request_id)
            elif isinstance(action, planner.FinishMinReady):
                self._apply_finish_min_ready(action.request_id)
        mono = time.monotonic()
        if mono - self._last_lock_gc >= self.lock_gc_interval:
            self._last_lock_gc = mono
            removed = self.store.remove_stale_request_locks(self.request_lock_max_age)
            if removed:
                log.info("removed %d lock directories of requests that are gone", removed)
            removed = self.store.remove_empty_nodes()
            if removed:
                log.info("removed %d empty node entries (locked by a client after their "
                         "node was deleted)", removed)

    def _delete_used(self, nodes, locked_nodes):
        """Between full cleanups, delete returned nodes at once: they hold quota."""
        workers = dict(self.workers)
        for node in nodes:
            if node.state == NodeState.USED and node.id not in locked_nodes \
                    and node.provider in workers \
                    and not getattr(workers[node.provider].adapter, "reuses_nodes", False):
                self._delete_node(node.id, "used")

    def _delete_node(self, node_id, reason):
        node = self.store.get_node(node_id)
        if node is None:
            return
        worker = self.workers.get(node.provider)
        if worker is None or worker.deleting(node_id):
            return
        try:
            lock = self.store.lock_node(node_id)
        except LockError:
            return
        node = self.store.get_node(node_id)
        if node is None or not self._still_deletable(node):
            lock.release()
            return
        if node.state not in (NodeState.DELETING, NodeState.DELETED):
            node.set_state(NodeState.DELETING)
            self.store.update_node(node)
        log.info("node %s on %s: deleting (%s)", node.id, node.provider, reason)
        worker.submit_delete(node, lock, reason)

    def _still_deletable(self, node):
        """Re-check a node after locking it: the plan was made from an older snapshot."""
        again = planner.plan_node_cleanup(
            [node], [], set(), set(), self.config.labels, {node.provider},
            self.config.max_hold_age, time.time())
        return any(isinstance(a, planner.DeleteNode) for a in again)

    def _deallocate(self, node_id, request_id, reason, only_if_request_gone=False):
        """Return a ready node allocated to ``request_id`` to the pool (under its lock)."""
        try:
            with self.store.lock_node(node_id):
                node = self.store.get_node(node_id)
                if node is None or node.state != NodeState.READY \
                        or node.allocated_to != request_id:
                    return
                if only_if_request_gone and self.store.get_request(request_id) is not None:
                    return
                log.info("node %s returned to the pool: %s", node_id, reason)
                node.allocated_to = None
                self.store.update_node(node)
        except LockError:
            pass

    def _reset_lost(self, request_id):
        try:
            lock = self.store.lock_request(request_id)
        except LockError:
            return
        with lock:
            req = self.store.get_request(request_id)
            if req is None or req.state != RequestState.PENDING:
                return
            for node in self.store.list_nodes():
                if node.allocated_to == req.id and node.state == NodeState.READY:
                    self._deallocate(node.id, req.id, f"request {req.id} was lost")
            req.nodes = []
            req.set_state(RequestState.REQUESTED)
            self.store.update_request(req)
            log.warning("request %s was pending with no launcher holding it: back in the queue",
                        req.id)

    def _handle_session_lost(self):
        """Every lock we held is gone: forget active requests, let workers abandon launches."""
        self._session_lost.clear()
        log.error("state store session lost: abandoning %d in-flight request(s)",
                  len(self.active))
        for ar in self.active.values():
            for lock in ar.node_locks.values():
                lock.released = True
            ar.lock.released = True
        self.active.clear()
        for worker in self.workers.values():
            worker.session_lost()


class _Retry(Exception):
    pass


def _newest_ready_upload(uploads, image, provider):
    try:
        from ..model.images import newest_ready_upload
    except ImportError:
        ready = [u for u in uploads if u.image == image and u.provider == provider
                 and str(u.state) == "ready"]
        return max(ready, key=lambda u: u.state_time or 0, default=None)
    return newest_ready_upload(uploads, image, provider)


def _count(metric, *labels):
    if metrics is not None and hasattr(metrics, metric):
        try:
            getattr(metrics, metric).labels(*labels).inc()
        except ValueError:
            pass


def _observe(metric, value, *labels):
    if metrics is not None and hasattr(metrics, metric):
        try:
            getattr(metrics, metric).labels(*labels).observe(value)
        except ValueError:
            pass


def _quiet(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:
        log.debug("ignored during cleanup: %s", exc)


def _version():
    from .. import __version__
    return __version__
