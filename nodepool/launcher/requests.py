"""Node requests: routing new ones to a pool, and carrying each accepted one to its end.

``route`` applies ``planner.plan_requests`` (accept, decline, fail) to the waiting requests;
``progress`` applies ``lifecycle.plan_held`` to the requests this launcher holds that have
something new: a node of theirs changed, a launch of theirs ended, the request record changed,
slots wait for room or a backoff, an error backs off, or their last plan acted.  The rest only
wait for their launches (thousands while a large fleet fills), and planning them every pass
made a pass cost the whole fleet.  Every ``FULL_PASS_INTERVAL``, after a configuration change,
a lost session and when an index cannot tell what changed, every held request is planned.

What is kept in memory per held request (``lifecycle.Held``) is only what the store cannot
tell: the locks this session holds and our own last copy of the request, whose version makes
every request write a compare-and-set.  Everything else (which slots are open, which nodes
are ready, failed or gone) is read from the store's records, so a failed write is simply
planned again.

Failure rules:

* each request is handled alone: an exception is logged with its id, the request is left for
  ``REQUEST_BACKOFF`` (doubling, capped) and every other request is served;
* a request lock or node lock that is no longer ours (session lost) is never written under;
  a lost compare-and-set means the request changed hands: we let it go without writing;
* a cloud that refused a launch for quota or capacity makes that pool's label wait
  (``pool_backoff``: 2 s doubling to 2 min) before it launches that label again, or until the
  cloud deleted a serving node of that provider (which freed room);
* the pool lock that serialises launch decisions across launchers is only tried, never
  waited for: a busy pool is tried again next pass.
"""
import logging
import threading
import time
from collections import ChainMap

from ..errors import ConflictError, LockError, NodepoolError, NotFoundError, StoreError
from ..model.images import newest_ready_upload
from ..model.records import Node
from ..model.states import NodeState, RequestState
from ..store.base import node_lock_path, request_lock_path
from .. import metrics
from . import lifecycle as lc
from . import planner
from .backoff import Backoff
from .fanout import Fanout
from .nodeindex import NodeIndex
from .provider_worker import build_launch_spec, choose_az
from .providers import quietly
from .reasons import Why
from .requestindex import RequestIndex

log = logging.getLogger("nodepool.launcher.requests")

# seconds between passes that plan every held request, not just those with news: a safety net
# for a cause of change this module does not follow
FULL_PASS_INTERVAL = 10.0


class _Retry(Exception):
    """The accept cannot complete now (a lock taken by someone, the pool filled): undo."""


class RequestHandler:
    def __init__(self, store, providers, config, launcher_name):
        self.store = store
        self.providers = providers
        self.config = config                   # () -> running configuration
        self.launcher_name = launcher_name
        self.held = {}                         # request id -> lifecycle.Held
        self.pool_backoff = Backoff(base=2.0, cap=120.0)    # (pool key, label)
        self.request_backoff = Backoff(base=1.0, cap=60.0)  # request id whose handling raised
        self.views = {}                        # pool key -> PoolView of the current pass
        self._seen_requests = {}               # request id -> record, the current pass's
        self.components = []                   # registered pool components, current pass
        self._launching_before = {}            # provider -> launches running before the snapshot
        self._launching_last = {}              # the same, one pass earlier
        self._owner = {}                       # node id -> id of the held request locking it
        self._index_position = None            # where ``progress`` is in the node index's
        self._request_position = None          # and the request index's changes
        self._replan = set()                   # held request ids to plan next pass whatever
        self._open = set()                     # held request ids with open slots (last plan)
        self._full_pass = (None, float("-inf"))   # (configuration, when) of the last full pass
        self.index = NodeIndex()               # the store's nodes, followed by what changed
        self.request_index = RequestIndex()    # the store's requests, likewise
        self.fanout = Fanout()                 # independent store work of a pass, side by side
        self._room_lock = threading.Lock()
        self.fleet = planner.Fleet()           # usage tallies, updated by what changed
        self._strays = set()                   # node records we created but could not lock
        self.on_fulfil = None                  # (request, provider, warm, seconds) -> None
        # (uploads, image, provider, request) -> the upload a launch boots (the launcher's
        # image rollout replaces it: validation.RolloutManager.choose)
        self.choose_upload = lambda uploads, image, provider, request: newest_ready_upload(
            uploads, image, provider)

    def note_launches(self):
        """Call before reading the pass's snapshot: a launch that ends between that read and
        the decision must count as running, not as lost (its node may still look unfinished)."""
        self._launching_last = self._launching_before
        self._launching_before = {name: w.launching_ids()
                                  for name, w in self.providers.workers.items()}

    # -- new requests ---------------------------------------------------------------------------

    def route(self, requests, index, views, components, locked_nodes, tenant_limits, now):
        """Decide and apply what every waiting request gets; return the pool keys paused.
        ``requests``: the pass's ``RequestIndex``; ``index``: its ``NodeIndex``."""
        self.views = {v.key: v for v in views}
        self.components = components
        self._seen_requests = requests.by_id
        waiting = requests.waiting_requests()
        skip = self.request_backoff.blocked(now) | {r.id for r in waiting if r.id in self.held}
        snap = planner.Snapshot(
            requests=waiting, nodes=(), pools=views, registered_pools=components,
            locked_nodes=locked_nodes, active_requests=skip, tenant_limits=tenant_limits,
            backoff=self.pool_backoff.blocked(now),
            fleet=self.fleet.catch_up(index, self.views))
        paused = set()
        launching = {}                         # pool key -> accepts that launch, in order
        direct = []                            # declines, failures, accepts of ready nodes
        for action in planner.plan_requests(snap):
            if isinstance(action, planner.Defer):
                if action.pauses:
                    paused.add(action.pool_key)
            elif isinstance(action, planner.Accept) and action.launch:
                launching.setdefault(action.pool_key, []).append(action)
            else:
                direct.append(action)
        # each on its own request (and its own ready nodes, planned apart): side by side
        self.fanout.run(lambda a: self._isolated(a.request_id, now, self._apply_route, a),
                        direct)
        for pool_key, accepts in launching.items():
            self._accept_launching(pool_key, accepts, now)
        for rid in self._open:
            held = self.held.get(rid)
            if held is not None:
                paused.add(held.pool_key)
        return paused

    def _apply_route(self, action):
        if isinstance(action, planner.Decline):
            self._decline(action)
        elif isinstance(action, planner.FailRequest):
            self._fail_declined(action)
        elif isinstance(action, planner.Accept):
            self._accept(action)

    def _accept_launching(self, pool_key, accepts, now):
        """Accepts that launch, one pool at a time: the pool lock is tried once and the pool's
        room counted once for all of them (not once per request: that cost grew with the
        fleet).  A pool another launcher is deciding for is tried again next pass."""
        pool = self.views[pool_key].pool
        try:
            plock = self._pool_lock(pool)
        except _Retry:
            return
        except StoreError as exc:
            log.warning("pool %s: launch lock not taken (%s); its requests wait a pass",
                        pool_key, exc)
            return
        with plock:
            try:
                # other launchers may have filled the pool since our snapshot
                self.store.sync_nodes()
                room = self._room(self.views[pool_key])
            except StoreError as exc:
                log.warning("pool %s: room not counted (%s); its requests wait a pass",
                            pool_key, exc)
                return
            # the room goes to the accepts in priority order, here; their store work (locks,
            # records, launches) then runs side by side.  Room granted to an accept that
            # does not go through is simply unused until the next pass counts again.
            granted = [action for action in accepts if room.take(action.launch)]
            self.fanout.run(lambda a: self._isolated(a.request_id, now, self._accept, a, True),
                            granted)

    def _isolated(self, request_id, now, fn, *args):
        """Run ``fn`` for one request; an error is that request's alone."""
        try:
            fn(*args)
        except Exception as exc:
            delay = self.request_backoff.failed(request_id, now)
            metrics.BACKOFFS.labels("", "request-error").inc()
            if isinstance(exc, NodepoolError):
                log.warning("request %s: %s failed (%s: %s); retrying in %.0fs", request_id,
                            getattr(fn, "__name__", fn), type(exc).__name__, exc, delay)
            else:
                log.exception("request %s: unexpected error in %s; retrying in %.0fs", request_id,
                              getattr(fn, "__name__", fn), delay)
        else:
            self.request_backoff.succeeded(request_id)

    def _image_appeared(self, action):
        """Whether a decline for a missing image was based on a stale view: the availability
        snapshot is refreshed only every few seconds, a decline is forever, so re-read first."""
        reason = action.reason
        if reason.kind is not Why.IMAGE_MISSING:
            return False
        key = self.providers.pool_key_of(action.pool_id)
        pool = self.providers.pool(key) if key else None
        label = pool.labels.get(reason.label) if pool else None
        return bool(label and label.diskimage and self.providers.image_ready(
            label.diskimage, pool.provider, fresh=True))

    def _decline(self, action):
        if self._image_appeared(action):
            return
        with self.store.request_if_free(action.request_id) as req:
            if req is None or req.state != RequestState.REQUESTED \
                    or action.pool_id in req.declined_by:
                return
            self._record_decline(req, action.pool_id, action.reason)

    def _fail_declined(self, action):
        """Every pool still registered has declined it (the others went away): it failed."""
        with self.store.request_if_free(action.request_id) as req:
            if req is None or req.state != RequestState.REQUESTED or not planner.request_failed(
                    req, [c.pool_id for c in self.components]):
                return
            req.set_state(RequestState.FAILED)
            self.store.update_request(req, check_version=True)
            log.warning("request %s for %s failed: every registered pool has declined it",
                        req.id, ",".join(req.node_types))

    def _record_decline(self, req, pool_id, reason):
        """Write this pool's decline (compare-and-set on ``req``'s version, which must have been
        read under the request lock); the request fails when every registered pool declined."""
        req.declined_by.append(pool_id)
        reasons = dict(req.extra.get("declined_reasons") or {})
        reasons[pool_id] = str(reason)
        req.extra["declined_reasons"] = reasons
        registered = [c.pool_id for c in self.components]
        if planner.request_failed(req, registered):
            req.set_state(RequestState.FAILED)
            log.warning("request %s for %s failed: every pool declined it (last: %s)",
                        req.id, ",".join(req.node_types), reason)
            metrics.REQUESTS_HANDLED.labels("", "", "failed").inc()
        else:
            req.set_state(RequestState.REQUESTED)
            log.info("request %s declined by %s: %s", req.id, pool_id, reason)
        self.store.update_request(req, check_version=True)

    def _accept(self, action, room_granted=False):
        """Take a request: lock it, assign its ready nodes, and launch the rest (only with
        ``room_granted``: the pool's room was counted for them under the pool lock)."""
        view = self.views[action.pool_key]
        pool = view.pool
        worker = self.providers.workers[pool.provider]
        # the request's lock and its ready nodes' are tried together (one round trip)
        locks = self.store.try_locks([request_lock_path(action.request_id)] +
                                     [node_lock_path(node_id) for _, node_id in action.assign])
        rlock = locks[0]
        if any(lock is None for lock in locks):
            for lock in locks:      # another launcher has the request, or a node: next pass
                if lock is not None:
                    quietly(lock.release)
            log.debug("request %s: not accepted this pass: %s locked by someone else",
                      action.request_id, ", ".join(
                          "the request" if i == 0 else f"node {action.assign[i - 1][1]}"
                          for i, lock in enumerate(locks) if lock is None))
            return
        node_locks = {node_id: lock for (_, node_id), lock in zip(action.assign, locks[1:])}
        for node_id in node_locks:
            self._owner[node_id] = action.request_id
        self._replan.add(action.request_id)         # a held request is planned next pass
        held = None
        sent = False        # whether a write was sent (its outcome may be unknown)
        try:
            # the pass's record stands in for a read, as for nodes: every write of the request
            # is compare-and-set on its version, so one changed since is let go, not overwritten
            seen = self._seen_requests.get(action.request_id)
            req = seen.copy() if seen is not None else self.store.get_request(action.request_id)
            if req is None or req.state != RequestState.REQUESTED \
                    or view.pool_id in req.declined_by:
                raise _Retry()
            held = lc.Held(req.id, pool.key, view.pool_id, rlock, req, node_locks)
            assigned = {}
            for label, node_id in action.assign:
                # the pass's record stands in for a read: the write is compare-and-set on
                # its version, so a node changed since the snapshot is simply not taken
                seen = self.index.by_id.get(node_id)
                node = seen.copy() if seen is not None else self.store.get_node(node_id)
                if node is None or node.state != NodeState.READY or node.allocated_to \
                        or label not in node.type:
                    raise _Retry()
                node.allocated_to = req.id
                node.tenant_name = req.tenant_name
                node.requestor = req.requestor
                assigned[node_id] = node
            if action.launch:
                if not room_granted:
                    raise _Retry()
                req.set_state(RequestState.PENDING)
                # the assignments and the request's new state: one compare-and-set write (a
                # node or the request changed since the snapshot: nothing is written)
                sent = True
                self.store.update_together(nodes=assigned.values(), requests=[req])
                self.held[req.id] = held
                held.az = self._choose_az(assigned.values(), worker, pool)
                # from here on the lifecycle owns it: a launch that fails to start leaves its
                # slot open and is planned again next pass
                try:
                    for label in action.launch:
                        self._launch(held, label, pool, worker)
                except Exception as exc:
                    log.warning("request %s: starting a launch on %s failed (%s); it is "
                                "retried", req.id, pool.key, exc)
                log.info("request %s accepted by %s: %d ready node(s) assigned, %d launching",
                         req.id, pool.key, len(action.assign), len(action.launch))
            else:
                held.unwritten = assigned     # written with the fulfilment, below
                self.held[req.id] = held
        except BaseException as exc:
            if held is None or held.request_id not in self.held:
                self._undo_accept(node_locks, rlock, action.request_id, sent)
            if isinstance(exc, (_Retry, NotFoundError, ConflictError)):
                return      # the pool filled / a node was taken / the requestor left / the
                            # request changed since the pass's snapshot: next pass decides
            raise
        if not action.launch:
            # a request served from ready nodes is fulfilled in this same pass
            try:
                self._advance(held, req, assigned)
            finally:
                if held.unwritten and self.held.get(req.id) is held:
                    # not fulfilled (an error, a record changed since the snapshot): nothing
                    # of it was written; the request is routed again next pass
                    self._forget(held)

    def _undo_accept(self, node_locks, rlock, request_id, sent):
        """Nothing was launched: give back the nodes and the request lock.  A write whose
        outcome is unknown (``sent``) may have assigned the nodes: that is undone first."""
        for node_id, lock in node_locks.items():
            if sent:
                self._return_node(node_id, request_id, lock)
            else:
                quietly(lock.release)
        quietly(rlock.release)

    def _room(self, view):
        """The pool's room now (call under its lock, after ``sync_nodes``).  Held requests are
        moved on side by side: the index and the tallies are brought up to date by one at a
        time."""
        with self._room_lock:
            self.index.refresh(self.store)
            return planner.Room(view, fleet=self.fleet.catch_up(self.index, self.views))

    def _pool_lock(self, pool):
        """Serialises launch decisions for one pool across launchers (held for milliseconds).
        Only tried: the loop never waits for it (a busy pool is tried again next pass)."""
        try:
            return self.store.lock(f"/nodepool/launcher-locks/{pool.provider}/{pool.name}",
                                   identifier=self.launcher_name)
        except LockError:
            raise _Retry() from None

    def _choose_az(self, assigned_nodes, worker, pool):
        for node in assigned_nodes:
            if node.az:
                return node.az
        return choose_az(pool, worker.azs)

    def _launch(self, held, label_name, pool, worker):
        """Create the node record (so the instance can never leak), lock it, start the launch."""
        prov = worker.provider
        req = held.request
        plabel = pool.labels[label_name]
        config = self.config()
        image_ext_id, image_id, access = None, None, None
        if plabel.diskimage:
            upload = self.choose_upload(self.store.list_uploads(image=plabel.diskimage,
                                                                provider=prov.name),
                                        plabel.diskimage, prov.name, req)
            if upload is not None:
                image_ext_id, image_id = upload.external_id, upload.path
            dimg = config.diskimages.get(plabel.diskimage)
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
                    launcher=held.pool_id, allocated_to=req.id, tenant_name=req.tenant_name,
                    requestor=req.requestor, attributes=pool.node_attributes, az=held.az,
                    image_id=image_id, cloud=prov.name,
                    resources=dict(worker.label_costs.get(label_name) or {"instances": 1}))
        if access:
            (node.username, node.python_path, node.shell_type, node.connection_type,
             node.connection_port) = access
        node = self.store.create_node(node)
        node.hostname = f"np{node.id}"
        try:
            nlock = self.store.lock_node(node.id)
        except Exception:
            # no instance exists yet: the record can go at once, and if the store is down now,
            # as soon as it answers (cleanup would wait INIT_GRACE, not knowing it is ours)
            self._strays.add(node.id)
            self._remove_strays()
            raise
        held.node_locks[node.id] = nlock
        self._owner[node.id] = held.request_id
        node.set_state(NodeState.BUILDING)
        self.store.update_node(node, check_version=True)
        spec = build_launch_spec(node, pool, plabel, self.launcher_name, image_ext_id, req)
        worker.submit_launch(node, nlock, spec, pool)
        held.launched += 1

    # -- held requests --------------------------------------------------------------------------

    def _remove_strays(self):
        """Delete node records we created but could not lock (no instance was ever started
        for them), unless they changed meanwhile."""
        for node_id in list(self._strays):
            try:
                node = self.store.get_node(node_id)
                if node is not None and node.state == NodeState.INIT:
                    if self.store.is_node_locked(node_id):
                        # e.g. by a contender of our own lock attempt whose answer was lost:
                        # the store deletes that once connected; try again next pass
                        continue
                    self.store.delete_node(node_id)
                self._strays.discard(node_id)
            except Exception as exc:
                log.debug("node %s (created, never launched): not removed yet: %s", node_id, exc)

    def progress(self, index, requests, now):
        """Move the held requests with news on (``lifecycle.plan_held``), each on its own.
        ``index``, ``requests``: the pass's ``NodeIndex`` and ``RequestIndex``."""
        if self._strays:
            self._remove_strays()
        if len(self.pool_backoff):
            self._lift_freed_room()
        by_id = index.by_id
        current = requests.by_id
        due = self._due(index, requests, now)
        # each held request is its own (its lock, its nodes): side by side
        self.fanout.run(lambda item: self._isolated(item[0], now, self._plan, item[1],
                                                    current.get(item[0]), by_id), due)
        if len(self.pool_backoff):
            held_pools = {h.pool_key for h in self.held.values()}
            self.pool_backoff.forget(lambda key: key[0] in self.views or key[0] in held_pools)
        self.request_backoff.forget(lambda rid: rid in current)

    def _lift_freed_room(self):
        """A label waiting after a quota or capacity refusal is tried again as soon as the
        cloud deleted the instance of a node of that provider that was serving (ready, in
        use, used, held) since the refusal: that freed room.  Room freed by others cannot be
        seen, so the timed wait stays for that; the failure count stays too."""
        for key in self.pool_backoff.keys():
            worker = self.providers.workers.get(key[0].split("/", 1)[0])
            since = self.pool_backoff.since(key)
            if worker is not None and since is not None and worker.last_freed_at > since:
                self.pool_backoff.lift(key)

    def _due(self, index, requests, now):
        """The held requests this pass plans, as ``(id, Held)``: see the module's docstring.
        ``index``, ``requests``: the pass's ``NodeIndex`` and ``RequestIndex``."""
        self._index_position, changed = index.changed_since(self._index_position)
        self._request_position, changed_requests = requests.changed_since(
            self._request_position)
        config = self.config()
        full = (changed is None or changed_requests is None or config is not self._full_pass[0]
                or now - self._full_pass[1] >= FULL_PASS_INTERVAL)
        if full:
            self._full_pass = (config, now)
            news = set(self.held)
        else:
            news = self._replan | self._open | self.request_backoff.keys()
            news.update(rid for rid in changed_requests if rid in self.held)
            ended = [nid for name, ids in self._launching_last.items()
                     for nid in ids - self._launching_before.get(name, frozenset())]
            for node_id in [*changed, *ended]:
                rid = self._owner.get(node_id)
                if rid is None:
                    continue
                held = self.held.get(rid)
                if held is not None and node_id in held.node_locks:
                    news.add(rid)
                else:
                    del self._owner[node_id]         # a stale entry: the node left the request
        backoff = self.request_backoff
        due = []
        for rid in sorted(news):
            held = self.held.get(rid)
            if held is None:                # let go since it was marked (or never taken)
                self._replan.discard(rid)
                self._open.discard(rid)
            elif not backoff.waiting(rid, now):
                due.append((rid, held))
        return due

    def _plan(self, held, current, by_id):
        """Plan one held request; it is planned again next pass unless all it does is wait for
        its launches (an error leaves it to the request backoff, which plans it again)."""
        rid = held.request_id
        try:
            actions = self._advance(held, current, by_id)
        finally:
            # slots waiting for room or a backoff: planned every pass, and the pool paused
            if held.open_slots and rid in self.held:
                self._open.add(rid)
            else:
                self._open.discard(rid)
        if all(isinstance(a, lc.Wait) and a.reason.kind is Why.LAUNCHING for a in actions):
            self._replan.discard(rid)
        elif rid in self.held:
            self._replan.add(rid)

    def _view(self, held):
        """What this process knows of one held request (costs the request's own nodes only:
        thousands of held requests are looked at every pass while a large fleet fills)."""
        worker = self.providers.worker_of(held.pool_key.split("/", 1)[0])
        in_flight = frozenset()
        if worker is not None:
            before = self._launching_before.get(worker.provider.name, frozenset())
            in_flight = frozenset(nid for nid in held.node_locks
                                  if nid in before or worker.is_launching(nid))
        blocked = frozenset(label for key, label in self.pool_backoff.blocked(time.monotonic())
                            if key == held.pool_key)
        return lc.HeldView(
            request_id=held.request_id, request=held.request,
            holds_request=not held.let_go and not held.lost and self.store.holds(held.lock),
            nodes=tuple((nid, self.store.holds(lock)) for nid, lock in held.node_locks.items()),
            in_flight=in_flight, blocked_labels=blocked,
            pool_present=self.providers.pool(held.pool_key) is not None)

    def _advance(self, held, current, by_id):
        """Plan and apply the lifecycle of one held request.  A node missing from the snapshot
        is read from the store first (a cache may lag behind a node just created)."""
        for _ in range(2):
            actions = lc.plan_held(self._view(held), current, by_id)
            verify = [a.node_id for a in actions if isinstance(a, lc.Verify)]
            if not verify:
                break
            by_id = ChainMap({}, by_id)         # the pass's index itself is left as it is
            for node_id in verify:
                node = self.store.get_node(node_id)
                if node is not None:
                    by_id[node_id] = node
                else:
                    # really gone (deleted by an operator): its lock went with it; the slot
                    # is open again and is launched anew
                    log.warning("request %s: node %s vanished from the store", held.request_id,
                                node_id)
                    lock = held.node_locks.pop(node_id, None)
                    if lock is not None:
                        lock.released = True
        held.open_slots = False
        for action in actions:
            self._apply(held, action, by_id)
            if held.lost:
                break
        return actions

    def _apply(self, held, action, by_id):
        if isinstance(action, lc.Forget):
            held.node_locks.pop(action.node_id, None)
        elif isinstance(action, lc.Discard):
            self._discard(held, by_id[action.node_id], action.reason)
        elif isinstance(action, lc.ReturnNode):
            self._return_node(action.node_id, held.request_id,
                              held.node_locks.pop(action.node_id))
        elif isinstance(action, lc.Launch):
            held.open_slots = True
            self._launch_open(held, action.labels)
        elif isinstance(action, lc.Wait):
            if action.reason.kind is Why.BACKOFF:
                held.open_slots = True
        elif isinstance(action, lc.Fulfil):
            self._fulfil(held, action.node_ids, by_id)
        elif isinstance(action, lc.GiveBack):
            self._give_back(held, action.reason)
        elif isinstance(action, lc.LetGo):
            log.info("request %s: letting it go (%s)", held.request_id, action.why)
            held.let_go = True
            quietly(held.lock.release)
        elif isinstance(action, lc.Done):
            self._forget(held)
        elif isinstance(action, lc.Drop):
            if not held.node_locks:
                self._forget(held)

    def _forget(self, held):
        for node_id, lock in held.node_locks.items():
            quietly(lock.release)
            if self._owner.get(node_id) == held.request_id:
                del self._owner[node_id]
        held.node_locks.clear()
        if not held.let_go:
            quietly(held.lock.release)
            held.let_go = True
        self.held.pop(held.request_id, None)
        self._replan.discard(held.request_id)
        self._open.discard(held.request_id)

    def _write_request(self, held, req, nodes=(), release=()):
        """Compare-and-set write of a held request (with ``nodes``: and of those nodes, and
        ``release``: letting those locks go, as one); a lost race means it changed hands."""
        try:
            if nodes or release:
                self.store.update_together(nodes=nodes, requests=[req], release=release)
            else:
                self.store.update_request(req, check_version=True)
        except ConflictError as exc:
            if nodes:
                log.info("request %s: a record changed since the pass's snapshot (%s): it is "
                         "routed again", held.request_id, exc)
            else:
                log.warning("request %s was changed by someone else while we held it (did our "
                            "session expire?): letting it go without writing", held.request_id)
            held.lost = True
            return False
        held.request = req
        return True

    def _fulfil(self, held, node_ids, by_id):
        req = held.request.copy()   # a failed write leaves our copy as it was
        req.nodes = list(node_ids)
        req.set_state(RequestState.FULFILLED)
        if req.requestor == planner.MIN_READY_REQUESTOR:
            # stock: nobody waits for it, so it is finished here, under the locks we hold,
            # instead of being written fulfilled and finished by a later pass (which takes
            # both locks and reads both records again)
            self._stock(held, node_ids, by_id)
        elif not self._write_request(
                held, req, [held.unwritten[nid] for nid in node_ids if nid in held.unwritten],
                # the nodes are the requestor's now: our locks go in the same write, so the
                # requestor taking them never queues behind us
                release=_locks_of(held)):
            return
        held.unwritten = {}
        provider, pool_name = held.pool_key.split("/", 1)
        for label in set(req.node_types):
            self.pool_backoff.succeeded((held.pool_key, label))
        self._forget(held)
        waited = time.time() - (req.created_time or time.time())
        metrics.REQUESTS_HANDLED.labels(provider, pool_name, "fulfilled").inc()
        metrics.REQUEST_SECONDS.labels(provider).observe(max(0.0, waited))
        if self.on_fulfil is not None:
            self.on_fulfil(req, provider, held.launched == 0, waited)
        log.info("request %s fulfilled by %s with node(s) %s", req.id, held.pool_key,
                 ",".join(req.nodes))

    def _stock(self, held, node_ids, by_id):
        """A min-ready request's ready nodes become unallocated stock, the request is deleted
        and our locks are let go: one write.  A failure leaves a request that is fulfilled
        again next pass, never a slot launched anew."""
        nodes = []
        for node_id in node_ids:
            if node_id in held.unwritten:     # an assignment never written: nothing to undo
                continue
            seen = by_id.get(node_id)
            node = _unassigned(seen if seen is not None else self.store.get_node(node_id),
                               held.request_id)
            if node is not None:
                nodes.append(node)
        try:
            self.store.update_together(nodes=nodes, release=_locks_of(held),
                                       delete_requests=[held.request_id])
        except ConflictError:
            # a node changed since the pass's snapshot: one at a time, each read again
            for node in nodes:
                self._deallocate(node.id, held.request_id)
            self.store.delete_request(held.request_id)

    def _deallocate(self, node_id, request_id, seen=None):
        """Clear a ready node's allocation to ``request_id`` (its lock is ours).  ``seen``: the
        pass's record, written compare-and-set instead of read again (read if it changed)."""
        node = _unassigned(seen if seen is not None else self.store.get_node(node_id),
                           request_id)
        while node is not None:
            try:
                self.store.update_node(node, check_version=True)
                return
            except ConflictError:
                if seen is None:
                    raise
                seen = None
                node = _unassigned(self.store.get_node(node_id), request_id)

    def _give_back(self, held, reason):
        req = held.request.copy()   # a failed write leaves our copy as it was
        req.nodes = []
        try:
            self._record_decline(req, held.pool_id, reason)
        except ConflictError:
            log.warning("request %s changed hands before it could be declined: letting it go",
                        held.request_id)
            held.lost = True
            return
        held.request = req
        held.let_go = True
        held.lock.release()

    def _discard(self, held, node, reason):
        """Delete a node of ours that will not serve; keep its lock through the delete."""
        if node.state == NodeState.ABORTED and node.type:
            delay = self.pool_backoff.failed((held.pool_key, node.type[0]), time.monotonic())
            metrics.BACKOFFS.labels(node.provider or "", "quota").inc()
            log.info("request %s: %s refused a node of %s for quota or capacity: that label "
                     "waits %.0fs before launching again", held.request_id, held.pool_key,
                     node.type[0], delay)
        if node.state in lc.LAUNCHING_STATES:
            # "its launch is no longer running" was judged from a snapshot older than the
            # worker's list: if the launch wrote since, look again next pass
            fresh = self.store.get_node(node.id)
            if fresh is None or fresh.state != node.state:
                return
            node = fresh
        else:
            node = node.copy()              # snapshot records are shared with the store's cache
        lock = held.node_locks[node.id]
        worker = self.providers.worker_of(node.provider)
        if worker is None:
            held.node_locks.pop(node.id)
            lock.release()       # its provider is gone from the configuration
            return
        if node.state not in (NodeState.DELETING, NodeState.DELETED):
            node.set_state(NodeState.DELETING)
            self.store.update_node(node, check_version=True)
        held.node_locks.pop(node.id)
        log.info("node %s on %s: deleting (%s)", node.id, node.provider, reason)
        worker.submit_delete(node, lock, reason)

    def _return_node(self, node_id, request_id, lock):
        """A ready node assigned to a request goes back to the pool; its lock is released."""
        try:
            self._deallocate(node_id, request_id)
        finally:
            lock.release()

    def _launch_open(self, held, labels):
        """Launch nodes for open slots as the pool's room allows (under the pool lock, tried)."""
        pool = self.providers.pool(held.pool_key)
        view = self.views.get(held.pool_key)
        if pool is None or view is None:
            return
        worker = self.providers.workers[pool.provider]
        try:
            plock = self._pool_lock(pool)
        except _Retry:
            return
        with plock:
            self.store.sync_nodes()
            room = self._room(view)
            for label in labels:
                if not room.take([label]):
                    return
                self._launch(held, label, pool, worker)

    def waiting_on_time(self):
        """Whether something waits for a clock rather than a store change: a held request
        with open slots (room, a backoff), or a request or pool label backing off."""
        return bool(len(self.request_backoff) or len(self.pool_backoff) or self._open)

    # -- session --------------------------------------------------------------------------------

    def session_lost(self):
        """The locks of the lost session are gone: they are marked released, so nothing is
        written or released under them, and every held request is planned again.  One whose
        request lock went is let go by its lifecycle like any request that changed hands
        (launches of the new session are waited for, its ready nodes go back to the pool);
        one taken in the new session (the store reconnected before we heard of the loss)
        carries on.  Forgetting them all would leave the new session's locks held forever.
        Returns how many requests were lost."""
        lost = 0
        for held in self.held.values():
            for lock in held.node_locks.values():
                if not self.store.holds(lock):
                    lock.released = True
            if not held.let_go and not self.store.holds(held.lock):
                held.lock.released = True
                lost += 1
        self._full_pass = (None, float("-inf"))     # every held request is planned next pass
        return lost

    def release_all(self):
        for held in list(self.held.values()):
            for lock in held.node_locks.values():
                quietly(lock.release)
            quietly(held.lock.release)


def _unassigned(node, request_id):
    """A copy of ready ``node`` no longer allocated to ``request_id``; None when there is
    nothing to clear (gone, not ready, or not allocated to it)."""
    if node is None or node.state != NodeState.READY or node.allocated_to != request_id:
        return None
    node = node.copy()
    node.allocated_to = None
    return node


def _locks_of(held):
    """Every lock a held request still has: its nodes' and, unless let go, its own."""
    return list(held.node_locks.values()) + ([] if held.let_go else [held.lock])
