"""Metastatic adapter: a client of the state store, like Zuul, that subdivides backing nodes.

Backing nodes
    A backing node is asked for with an ephemeral node request for the ``backing-label``
    (requestor ``NodePool:metastatic:<provider>``), served by whichever provider can.  Once
    fulfilled, the adapter locks the node, checks it is allocated to that request, marks it
    ``in-use`` with ``user_data`` ``{nodepool_kept_by: <provider>, label, allocated}`` and
    deletes the request: from then on the adapter holds the node's lock.  The launcher's
    cleanup leaves such a node alone while this provider is configured, even unlocked
    (``drivers.base.KEPT_BY``).  Returning it: state ``used``, then unlock; its own provider
    deletes it.

Slots
    Each backing node has ``max-parallel-jobs`` slots.  A metastatic node takes one: its
    ``external_id`` is ``<backing node id>-<slot>`` and its ``driver_data``
    ``{backing_node, slot}`` records the tie in the store, which is what a restart rebuilds from.
    Deleting a metastatic node frees its slot.

Requests end under every error
    A launch state machine that submitted a request deletes it itself on any error.  One that
    is dropped without finishing (launch timeout, lost session) stops polling its request; the
    adapter's ``periodic()`` deletes every request of ours nobody polled for ``ABANDONED``
    seconds, and any request with our requestor it does not know (left by an earlier run).
    A fulfilled request nobody waits for any more is still ended the same way: its nodes go
    back to the pool (the launcher deallocates nodes of gone requests).

Restarts
    ``start()`` and ``periodic()`` re-adopt every in-use node kept by this provider: lock it
    (retried while the old session's lock lives), re-read it, and rebuild its slots from the
    metastatic nodes' ``driver_data``.  A backing node is thus never leaked: it is re-adopted and
    returned once empty (after ``grace-time``), or, if it is gone, its metastatic nodes are
    handled as lost.  Within one launcher (a config change replaces the adapter) the held locks
    are handed to the next adapter of the same provider.

Lost backing nodes
    A backing node whose record vanished, whose state changed, or whose lock we lost is
    dropped: its free (``ready``, unlocked) metastatic nodes are marked ``failed`` (cleanup
    deletes them), nodes in use stay with their user until returned, and its slots are gone.
"""
import logging
import threading
import time

from ...errors import LockError, NotFoundError, StoreError, TransientCloudError
from ...model.quota import Resources
from ...model.records import NodeRequest
from ...model.states import NodeState, RequestState
from ..base import (KEPT_BY, META_NODE_ID, META_POOL, META_PROVIDER, Adapter, Instance,
                    StateMachine, kept_by)

log = logging.getLogger("nodepool.drivers.metastatic")

ABANDONED = 30.0          # seconds a request may go unpolled before it is ended
RECONCILE = 2.0           # seconds between checks of the backing nodes against the store
OUTCOME_KEPT = 300.0      # seconds a delivered request's outcome waits for its other launches

HANDOVER_WAIT = 60.0      # seconds a stopped adapter's locks wait for the next adapter
# locks held by a stopped adapter, for the next adapter of the same provider and store
_HANDOVER = {}
_HANDOVER_LOCK = threading.Lock()


def _release_unclaimed(key, parked):
    with _HANDOVER_LOCK:
        if _HANDOVER.get(key) is not parked:
            return                     # claimed by the next adapter
        del _HANDOVER[key]
    for node_id, lock in parked.items():
        try:
            lock.release()
            log.info("provider %s: no adapter took over backing node %s: unlocked",
                     key[1], node_id)
        except Exception:
            pass


class _Slots:
    """The slots of a backing node (held or still pending): ``slots[i]`` is (metastatic node
    id, pool) or None."""

    def used(self):
        return sum(1 for s in self.slots if s is not None)

    def free_slot(self):
        for index, slot in enumerate(self.slots):
            if slot is None:
                return index
        return None


class PendingBacking(_Slots):
    """A backing node asked for and not delivered yet.  Launches that find no free slot on a
    held node take slots of a pending one too, so parallel launches share one request."""

    def __init__(self, request_id, label, slots):
        self.request_id = request_id
        self.label = label
        self.slots = [None] * slots           # (metastatic node id, pool) or None
        self.polled = time.monotonic()


class BackingNode(_Slots):
    """One backing node this adapter holds: its lock and its slots."""

    def __init__(self, node, lock, label, slots, allocated):
        self.node = node
        self.lock = lock
        self.label = label                    # the backing label
        self.slots = [None] * slots           # (metastatic node id, pool) or None
        self.allocated = allocated            # wall-clock time we took it
        self.last_freed = time.time()

    @property
    def id(self):
        return self.node.id


def external_id(backing_id, slot):
    return f"{backing_id}-{slot}"


def parse_external_id(value):
    """``(backing node id, slot)`` of a metastatic external id, or None."""
    try:
        backing, slot = str(value).rsplit("-", 1)
        return backing, int(slot)
    except (ValueError, TypeError):
        return None


class MetastaticAdapter(Adapter):
    pause_at_quota = True

    def __init__(self, provider, rate_limiter=None):
        super().__init__(provider, rate_limiter)
        self.requestor = f"NodePool:metastatic:{provider.name}"
        self.backing = {}           # backing node id -> BackingNode
        self.pending = {}           # request id -> PendingBacking
        self.outcome = {}           # request id -> ("node" | "error", id or text, when)
        self.abandoned_after = ABANDONED
        self.reconcile_every = RECONCILE
        self._last_reconcile = -1e9
        self._lock = threading.RLock()
        self._labels = {lbl.name: lbl for lbl in provider.labels()}

    # -- configuration ----------------------------------------------------------------------------

    def _label_config(self, backing_label):
        """The options of the labels backed by ``backing_label`` (they agree, see the schema)."""
        for label in self._labels.values():
            if label.options["backing-label"] == backing_label:
                return label.options
        return None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self):
        if self.store is None:
            raise TransientCloudError(f"provider {self.provider.name}: the metastatic driver "
                                      f"needs the launcher's store")
        with self._lock:
            self._readopt()

    def stop(self):
        """End our pending requests; park held locks for the next adapter of this provider
        (a config change).  Locks nobody claims within ``HANDOVER_WAIT`` seconds (the provider
        was removed) are released, so cleanup can take the nodes; when the process ends, its
        store session drops them anyway."""
        with self._lock:
            for request_id in list(self.pending):
                self._end_request(request_id)
            if self.store is not None and self.backing:
                key = (id(self.store), self.provider.name)
                parked = {b.id: b.lock for b in self.backing.values()}
                with _HANDOVER_LOCK:
                    _HANDOVER[key] = parked
                timer = threading.Timer(HANDOVER_WAIT, _release_unclaimed, (key, parked))
                timer.daemon = True
                timer.start()
            self.backing = {}

    def periodic(self):
        with self._lock:
            now = time.monotonic()
            for request_id, pending in list(self.pending.items()):
                if now - pending.polled > self.abandoned_after:
                    log.warning("provider %s: request %s for a backing node was abandoned by "
                                "its launch: ending it", self.provider.name, request_id)
                    self._end_request(request_id)
            for request_id, (_, _, when) in list(self.outcome.items()):
                if now - when > OUTCOME_KEPT:
                    del self.outcome[request_id]
            if now - self._last_reconcile >= self.reconcile_every:
                self._last_reconcile = now
                self._reconcile()

    # -- store housekeeping -----------------------------------------------------------------------

    def _readopt(self):
        """Adopt every in-use node kept by this provider that we do not hold yet (taking the
        locks a replaced adapter of this provider parked), and rebuild slots from the
        metastatic nodes' ``driver_data``."""
        with _HANDOVER_LOCK:
            parked = _HANDOVER.pop((id(self.store), self.provider.name), {})
        nodes = self.store.list_nodes()
        adopted = set()
        for node in nodes:
            if node.id in self.backing or kept_by(node) != self.provider.name:
                continue
            if node.state != NodeState.IN_USE:
                continue
            lock = parked.pop(node.id, None)
            if lock is None:
                try:
                    lock = self.store.lock_node(node.id, identifier=self.requestor)
                except LockError:
                    continue                  # the old session still holds it: next time
            fresh = self.store.get_node(node.id)
            if fresh is None or fresh.state != NodeState.IN_USE or \
                    kept_by(fresh) != self.provider.name:
                lock.release()
                continue
            data = fresh.user_data
            options = self._label_config(data.get("label"))
            slots = options["max-parallel-jobs"] if options else 0
            self.backing[node.id] = BackingNode(fresh, lock, data.get("label"), slots,
                                                data.get("allocated") or time.time())
            adopted.add(node.id)
            log.info("provider %s: re-adopted backing node %s (%s)", self.provider.name,
                     node.id, data.get("label"))
        for lock in parked.values():       # a parked node that is no longer ours
            try:
                lock.release()
            except Exception:
                pass
        for node in nodes:
            tie = node.driver_data if isinstance(node.driver_data, dict) else {}
            if node.provider != self.provider.name or "backing_node" not in tie:
                continue
            if tie["backing_node"] not in adopted:
                continue              # slots of nodes held already are kept in memory
            backing = self.backing[tie["backing_node"]]
            slot = tie.get("slot")
            if isinstance(slot, int) and slot < len(backing.slots) \
                    and node.state not in (NodeState.DELETED,):
                backing.slots[slot] = (node.id, node.pool)

    def _reconcile(self):
        try:
            self._readopt()
            self._end_unknown_requests()
            for backing in list(self.backing.values()):
                self._check_backing(backing)
            self._fail_orphans()
        except (StoreError, LockError) as exc:
            log.warning("provider %s: backing nodes not checked (next pass retries): %s",
                        self.provider.name, exc)

    def _end_unknown_requests(self):
        for req in self.store.list_requests():
            if req.requestor == self.requestor and req.id not in self.pending:
                log.info("provider %s: ending request %s left by an earlier run",
                         self.provider.name, req.id)
                self._end_request(req.id)

    def _check_backing(self, backing):
        node = self.store.get_node(backing.id)
        lost = None
        if node is None:
            lost = "its record is gone"
        elif node.state != NodeState.IN_USE:
            lost = f"it is {node.state.value}"
        elif not self.store.holds(backing.lock):
            lost = "its lock was lost"
        if lost:
            log.warning("provider %s: backing node %s lost (%s): its metastatic nodes are "
                        "lost too", self.provider.name, backing.id, lost)
            self._drop(backing)
            return
        backing.node = node
        if backing.used():
            return
        options = self._label_config(backing.label) or {}
        now = time.time()
        age = now - backing.allocated
        max_age = options.get("max-age")
        expired = max_age is not None and age >= max_age
        idle = now - backing.last_freed >= options.get("grace-time", 0)
        retained = age >= options.get("min-retention-time", 0)
        if (idle and retained) or expired:
            self._release(backing, "max-age reached" if expired else "grace time over")

    def _release(self, backing, why):
        """Return an empty backing node: ``used``, then unlock (its provider deletes it)."""
        try:
            node = self.store.get_node(backing.id)
            if node is not None and node.state == NodeState.IN_USE:
                node.set_state(NodeState.USED)
                self.store.update_node(node)
        except NotFoundError:
            pass
        finally:
            try:
                backing.lock.release()
            except Exception:
                pass
            self.backing.pop(backing.id, None)
        log.info("provider %s: returned backing node %s (%s)", self.provider.name, backing.id,
                 why)

    def _drop(self, backing):
        for slot in backing.slots:
            if slot is not None:
                self._fail_node(slot[0], f"backing node {backing.id} lost")
        try:
            if self.store.holds(backing.lock):
                backing.lock.release()
        except Exception:
            pass
        self.backing.pop(backing.id, None)

    def _fail_orphans(self):
        """Ready metastatic nodes of ours tied to a backing node we do not hold and that is
        not ours any more (gone, or returned): lost."""
        nodes = {n.id: n for n in self.store.list_nodes()}
        for node in nodes.values():
            tie = node.driver_data if isinstance(node.driver_data, dict) else {}
            if node.provider != self.provider.name or "backing_node" not in tie:
                continue
            if tie["backing_node"] in self.backing or node.state != NodeState.READY:
                continue
            backing = nodes.get(tie["backing_node"])
            if backing is not None and backing.state == NodeState.IN_USE and \
                    kept_by(backing) == self.provider.name:
                continue                  # ours, not re-adopted yet (its old lock lives)
            self._fail_node(node.id, f"backing node {tie['backing_node']} lost")

    def _fail_node(self, node_id, why):
        """Mark a free metastatic node ``failed`` (cleanup deletes it); nodes someone holds
        stay with them."""
        try:
            lock = self.store.lock_node(node_id, identifier=self.requestor)
        except LockError:
            return
        try:
            node = self.store.get_node(node_id)
            if node is not None and node.state == NodeState.READY:
                node.set_state(NodeState.FAILED)
                node.comment = why
                self.store.update_node(node)
                log.warning("provider %s: node %s failed: %s", self.provider.name, node_id, why)
        finally:
            lock.release()

    # -- requests ---------------------------------------------------------------------------------

    def request_backing(self, backing_label, node_id, pool):
        """Ask for a new backing node and take its first slot: the request id."""
        options = self._label_config(backing_label)
        req = NodeRequest(node_types=[backing_label], requestor=self.requestor,
                          requestor_data={"metastatic-node": node_id},
                          created_time=time.time())
        req = self.store.submit_request(req, ephemeral=True)
        pending = PendingBacking(req.id, backing_label, options["max-parallel-jobs"])
        pending.slots[0] = (node_id, pool)
        with self._lock:
            self.pending[req.id] = pending
        log.info("provider %s: node %s: requested a %s backing node (request %s)",
                 self.provider.name, node_id, backing_label, req.id)
        return req.id

    def _end_request(self, request_id):
        self.pending.pop(request_id, None)
        try:
            self.store.delete_request(request_id)
        except NotFoundError:
            pass
        except StoreError as exc:
            log.warning("provider %s: request %s not deleted (retried by periodic "
                        "housekeeping): %s", self.provider.name, request_id, exc)

    def leave_request(self, request_id, node_id):
        """A launch waiting on ``request_id`` gives up (its own error): free its slot of the
        pending node, and end the request when nobody else waits on it."""
        with self._lock:
            pending = self.pending.get(request_id)
            if pending is None:
                return
            pending.slots = [None if s and s[0] == node_id else s for s in pending.slots]
            if not pending.used():
                self._end_request(request_id)

    def poll_backing(self, request_id, backing_label):
        """The ``BackingNode`` delivered for ``request_id``, None while pending.  The first
        poller of a fulfilled request adopts the node and ends the request; raises
        TransientCloudError when the request failed (for every launch waiting on it)."""
        with self._lock:
            done = self.outcome.get(request_id)
            if done is not None:
                kind, value, _ = done
                if kind == "node" and value in self.backing:
                    return self.backing[value]
                raise TransientCloudError(value if kind == "error" else
                                          f"provider {self.provider.name}: backing node "
                                          f"{value} is gone")
            pending = self.pending.get(request_id)
            if pending is None:
                raise TransientCloudError(f"provider {self.provider.name}: request "
                                          f"{request_id} for a backing node was ended")
            pending.polled = time.monotonic()
        req = self.store.get_request(request_id)
        if req is None:
            return self._fail_request(request_id, f"provider {self.provider.name}: request "
                                                  f"{request_id} for a {backing_label} backing "
                                                  f"node vanished")
        if req.state == RequestState.FAILED:
            reasons = "; ".join(sorted(set((req.extra.get("declined_reasons") or {})
                                           .values()))) or "declined by every pool"
            return self._fail_request(request_id, f"provider {self.provider.name}: no "
                                                  f"{backing_label} backing node: {reasons}")
        if req.state != RequestState.FULFILLED:
            return None
        [node_id] = req.nodes
        try:
            lock = self.store.lock_node(node_id, identifier=self.requestor)
        except LockError:
            return None           # the launcher still holds it for a moment: next step
        try:
            backing = self._adopt(req, node_id, lock, backing_label)
        except TransientCloudError as exc:
            return self._fail_request(request_id, str(exc))
        except BaseException:
            with self._lock:
                self._end_request(request_id)
            raise
        with self._lock:
            self.outcome[request_id] = ("node", backing.id, time.monotonic())
            self._end_request(request_id)
        return backing

    def _fail_request(self, request_id, message):
        with self._lock:
            self.outcome[request_id] = ("error", message, time.monotonic())
            self._end_request(request_id)
        raise TransientCloudError(message)

    def _adopt(self, req, node_id, lock, backing_label):
        """Take a fulfilled request's node: check, mark in-use and kept by us.  The slots
        the pending node had handed out carry over."""
        try:
            node = self.store.get_node(node_id)
            if node is None or node.allocated_to != req.id or node.state != NodeState.READY:
                raise TransientCloudError(f"provider {self.provider.name}: backing node "
                                          f"{node_id} is no longer allocated to request {req.id}")
            now = time.time()
            node.set_state(NodeState.IN_USE)
            node.user_data = {KEPT_BY: self.provider.name, "label": backing_label,
                              "allocated": now}
            self.store.update_node(node)
        except BaseException:
            lock.release()
            raise
        options = self._label_config(backing_label)
        backing = BackingNode(node, lock, backing_label, options["max-parallel-jobs"], now)
        with self._lock:
            pending = self.pending.get(req.id)
            if pending is not None:
                backing.slots[:len(pending.slots)] = pending.slots[:len(backing.slots)]
            self.backing[node.id] = backing
        log.info("provider %s: took backing node %s (%s, %s)", self.provider.name, node.id,
                 backing_label, node.interface_ip)
        return backing

    # -- slots ------------------------------------------------------------------------------------

    def take_slot(self, backing_label, node_id, pool):
        """A free slot for ``node_id`` on a held backing node of ``backing_label`` (the
        fullest first, to let the others go) or, failing that, on a pending one:
        ``(BackingNode, slot)``, ``(request id, slot)`` or None."""
        options = self._label_config(backing_label) or {}
        max_age = options.get("max-age")
        now = time.time()
        with self._lock:
            held = [b for b in self.backing.values()
                    if b.label == backing_label and b.free_slot() is not None
                    and (max_age is None or now - b.allocated < max_age)]
            if held:
                backing = max(held, key=lambda b: (b.used(), b.id))
                slot = backing.free_slot()
                backing.slots[slot] = (node_id, pool)
                return backing, slot
            pending = [p for p in self.pending.values()
                       if p.label == backing_label and p.free_slot() is not None]
            if pending:
                chosen = max(pending, key=lambda p: (p.used(), p.request_id))
                slot = chosen.free_slot()
                chosen.slots[slot] = (node_id, pool)
                return chosen.request_id, slot
            return None

    def free_slot(self, ext_id):
        parsed = parse_external_id(ext_id)
        if parsed is None:
            return
        with self._lock:
            backing = self.backing.get(parsed[0])
            if backing is not None and parsed[1] < len(backing.slots) and \
                    backing.slots[parsed[1]] is not None:
                backing.slots[parsed[1]] = None
                backing.last_freed = time.time()

    def instance(self, backing, slot, node_id=None, pool=None):
        node = backing.node
        held = backing.slots[slot]
        node_id = node_id or (held[0] if held else None)
        pool = pool or (held[1] if held else None)
        label = next((lbl for lbl in self._labels.values()
                      if lbl.options["backing-label"] == backing.label), None)
        checking = label.options.get("host-key-checking") if label else None
        if checking is None and pool in self.provider.pools:
            checking = self.provider.pools[pool].host_key_checking
        return Instance(
            external_id=external_id(backing.id, slot),
            metadata={META_NODE_ID: node_id, META_PROVIDER: self.provider.name,
                      META_POOL: pool},
            ready=True, interface_ip=node.interface_ip, public_ipv4=node.public_ipv4,
            private_ipv4=node.private_ipv4, public_ipv6=node.public_ipv6, cloud=node.cloud,
            region=node.region, az=node.az, host_id=node.host_id, slot=slot,
            driver_data={"backing_node": backing.id, "slot": slot},
            username=node.username, python_path=node.python_path, shell_type=node.shell_type,
            connection_type=node.connection_type, connection_port=node.connection_port,
            # with host-key-checking the framework scans the backing node's address itself
            host_keys=None if checking else list(node.host_keys or []),
            resources=Resources.of(instances=1))

    # -- adapter contract -------------------------------------------------------------------------

    def create_state_machine(self, spec):
        return CreateSlot(self, spec)

    def delete_state_machine(self, ext_id):
        return FreeSlot(self, ext_id)

    def list_instances(self):
        with self._lock:
            return [self.instance(b, i) for b in self.backing.values()
                    for i, s in enumerate(b.slots) if s is not None]

    def quota_for_label(self, label):
        return Resources.of(instances=1)


class CreateSlot(StateMachine):
    """A free slot of a held backing node, else a request for a new one, then a slot on it."""

    WAITING = "waiting for a backing node"

    def __init__(self, adapter, spec):
        super().__init__()
        self.adapter = adapter
        self.spec = spec
        self.backing_label = spec.label.options["backing-label"]
        self.request_id = None
        self.slot = None

    def advance(self):
        adapter, spec = self.adapter, self.spec
        if self.state == self.START:
            got = adapter.take_slot(self.backing_label, spec.node_id, spec.pool.name)
            if got is None:
                self.request_id = adapter.request_backing(self.backing_label, spec.node_id,
                                                          spec.pool.name)
                self.slot = 0
                self.state = self.WAITING
                return None
            where, self.slot = got
            if isinstance(where, BackingNode):
                return self._done(where, self.slot)
            self.request_id = where            # a slot of a backing node on its way
            self.state = self.WAITING
            return None
        if self.state == self.WAITING:
            try:
                backing = adapter.poll_backing(self.request_id, self.backing_label)
            except BaseException:
                adapter.leave_request(self.request_id, spec.node_id)
                raise
            if backing is None:
                return None
            held = backing.slots[self.slot] if self.slot < len(backing.slots) else None
            if held is None or held[0] != spec.node_id:
                raise TransientCloudError(f"provider {adapter.provider.name}: backing node "
                                          f"{backing.id} has no slot for node {spec.node_id}")
            return self._done(backing, self.slot)
        return None

    def _done(self, backing, slot):
        self.external_id = external_id(backing.id, slot)
        self.complete = True
        log.info("provider %s: node %s on backing node %s slot %d", self.adapter.provider.name,
                 self.spec.node_id, backing.id, slot)
        return self.adapter.instance(backing, slot, self.spec.node_id, self.spec.pool.name)


class FreeSlot(StateMachine):
    """Deleting a metastatic node frees its slot; the backing node is returned later."""

    def __init__(self, adapter, ext_id):
        super().__init__()
        self.adapter = adapter
        self.external_id = ext_id

    def advance(self):
        self.adapter.free_slot(self.external_id)
        self.complete = True
        return True
