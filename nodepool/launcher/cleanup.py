"""Cleanup: nodes nobody will use again, requests whose launcher died, leaked instances.

``plan_node_cleanup`` and ``leaked_instances`` decide (pure functions over a snapshot); the
``Cleanup`` class applies the node and request decisions through the store, each under the
lock it needs and re-checked against a fresh read, because the plan was made from an older
snapshot.  Deletes themselves run in the provider workers (``DeleteJob``), which keep the
node's lock and back off while a delete fails.
"""
import logging
import time
from dataclasses import dataclass

from ..drivers.base import kept_by
from ..errors import ConflictError, LockError, NotFoundError
from ..model.quota import Resources
from ..model.states import NodeState, RequestState
from .fanout import Fanout

log = logging.getLogger("nodepool.launcher.cleanup")

INIT_GRACE = 60          # an unlocked ``init`` node younger than this is being created
REQUEST_LOCK_MAX_AGE = 8 * 3600   # Nodepool's age for removing a gone request's lock directory


@dataclass(frozen=True)
class DeleteNode:
    node_id: str
    reason: str


@dataclass(frozen=True)
class Deallocate:
    node_id: str
    reason: str


@dataclass(frozen=True)
class ResetLostRequest:
    request_id: str


# -- cleanup --------------------------------------------------------------------------------------

# ``deleted`` is written just before the record is removed: one still there is a delete whose
# last step failed (a store error, a crash), finished like any other unlocked delete
ABANDONED_STATES = (NodeState.INIT, NodeState.BUILDING, NodeState.FAILED, NodeState.ABORTED,
                    NodeState.IN_USE, NodeState.USED, NodeState.DELETING, NodeState.TESTING,
                    NodeState.DELETED)


def plan_node_cleanup(nodes, requests, locked_nodes, locked_requests, labels, providers,
                      max_hold_age, now, reusable_providers=(), configured_providers=()):
    """Which nodes to delete or release, and which lost requests to reset (pure).

    Only nodes of ``providers`` (the providers this launcher runs) are touched.  A node that
    somebody holds locked is never touched, nor an in-use node kept by one of the
    ``configured_providers`` (``drivers.base.KEPT_BY``: a metastatic backing node).
    ``reusable_providers`` return used nodes to ready (static hosts) instead of deleting them.
    """
    actions = []
    request_ids = {r.id for r in requests}
    for node in nodes:
        if node.provider not in providers or node.id in locked_nodes:
            continue
        state = node.state
        if state == NodeState.IN_USE and kept_by(node) in configured_providers:
            continue
        if state == NodeState.READY:
            if node.allocated_to and node.allocated_to not in request_ids:
                actions.append(Deallocate(node.id, f"request {node.allocated_to} is gone"))
                continue
            label = labels.get(node.type[0]) if node.type else None
            age = now - (node.state_time or now)
            if (not node.allocated_to and label is not None and label.max_ready_age
                    and age > label.max_ready_age):
                actions.append(DeleteNode(node.id, f"ready for {age:.0f}s, longer than "
                                                   f"max-ready-age {label.max_ready_age}s"))
            continue
        if state == NodeState.HOLD:
            held = now - (node.state_time or now)
            if node.hold_expiration and node.hold_expiration > 0 and held > node.hold_expiration:
                actions.append(DeleteNode(node.id, f"hold expired after {node.hold_expiration}s"))
            elif max_hold_age and max_hold_age > 0 and held > max_hold_age:
                actions.append(DeleteNode(node.id, f"held longer than max-hold-age {max_hold_age}s"))
            continue
        if state in ABANDONED_STATES:
            if state == NodeState.USED and node.provider in reusable_providers:
                continue  # the provider returns it to ready itself
            reason = {NodeState.USED: "used",
                      NodeState.DELETING: "marked for deletion",
                      NodeState.DELETED: "deleted, but its record was left behind"}.get(
                          state, f"{state.value} and not locked by anyone")
            actions.append(DeleteNode(node.id, reason))
    for req in requests:
        if req.state == RequestState.PENDING and req.id not in locked_requests:
            actions.append(ResetLostRequest(req.id))
    return actions


# -- leaked instances -----------------------------------------------------------------------------

# states of a node that serves (or could serve) a request: its instance is settled, and
# deleting one frees cloud room
STABLE_STATES = (NodeState.READY, NodeState.IN_USE, NodeState.USED, NodeState.HOLD)


def leaked_instances(provider_name, instances, nodes, suspects):
    """Instances tagged as ours with no node that owns them.

    Returns ``(to_delete, new_suspects)``: an instance is deleted only when it was already a
    suspect on the previous pass (seen leaked twice), so a launch whose node record is being
    written is never reaped.  ``suspects`` and ``new_suspects`` are sets of external ids.
    """
    by_id = {n.id: n for n in nodes}
    now_suspect = set()
    for inst in instances:
        if inst.provider_name != provider_name or inst.deleted:
            continue
        node = by_id.get(inst.node_id)
        if node is None:
            leaked = True
        else:
            leaked = (node.external_id not in (None, inst.external_id)
                      and node.state in STABLE_STATES)
        if leaked:
            now_suspect.add(inst.external_id)
    to_delete = [inst for inst in instances if inst.external_id in now_suspect
                 and inst.external_id in suspects]
    return to_delete, now_suspect


def unmanaged_usage(instances, ours):
    """Cloud usage not accounted to this provider's node records (other tools, leaks);
    ``ours``: the external ids those records carry."""
    total = Resources()
    for inst in instances:
        if inst.deleted or inst.external_id in ours:
            continue
        total += inst.resources or Resources.of(instances=1)
    return total


# -- applying the decisions -----------------------------------------------------------------------

def return_to_pool(store, node_id, request_id, reason, only_if_request_gone=False):
    """Return a ready node allocated to ``request_id`` to the pool (under its lock); True when
    it did."""
    try:
        with store.lock_node(node_id):
            node = store.get_node(node_id)
            if node is None or node.state != NodeState.READY or node.allocated_to != request_id:
                return
            if only_if_request_gone and store.get_request(request_id) is not None:
                return
            log.info("node %s returned to the pool: %s", node_id, reason)
            node.allocated_to = None
            store.update_node(node, check_version=True)
            return True
    except LockError:
        pass
    return False


class Cleanup:
    """Applies ``plan_node_cleanup``; collects lock directories of gone requests."""

    def __init__(self, store, providers, config, held_requests, lock_gc_interval,
                 request_lock_max_age=REQUEST_LOCK_MAX_AGE):
        self.store = store
        self.providers = providers
        self.config = config                    # () -> the running configuration
        self.held_requests = held_requests      # () -> ids of requests this launcher holds
        self.lock_gc_interval = lock_gc_interval
        self.request_lock_max_age = request_lock_max_age
        self._last_lock_gc = 0.0
        self.fanout = Fanout()                  # independent deletes of a pass, side by side
        self.on_returned = lambda node: None    # a node given back unused (image rollout)

    def run(self, nodes, requests, locked_nodes, locked_requests, now):
        config = self.config()
        workers = dict(self.providers.workers)
        reusable = {name for name, w in workers.items()
                    if getattr(w.adapter, "reuses_nodes", False)}
        actions = plan_node_cleanup(nodes, requests, locked_nodes, locked_requests,
                                    config.labels, set(workers), config.max_hold_age, now,
                                    reusable, set(config.providers))
        by_id = {n.id: n for n in nodes}
        held = self.held_requests()
        for action in actions:
            try:
                if isinstance(action, DeleteNode):
                    node = by_id[action.node_id]
                    if node.state == NodeState.INIT and now - (node.state_time or now) < INIT_GRACE:
                        continue
                    self.delete_node(action.node_id, action.reason, seen=node)
                elif isinstance(action, Deallocate):
                    node = by_id[action.node_id]
                    if return_to_pool(self.store, node.id, node.allocated_to, action.reason,
                                      only_if_request_gone=True):
                        self.on_returned(node)
                elif isinstance(action, ResetLostRequest) and action.request_id not in held:
                    self.reset_lost(action.request_id)
            except Exception:
                # one node or request must not stop the others: it is planned again next pass
                log.exception("cleanup action %s failed (will retry)", action)
        self._collect_locks()

    def delete_used(self, index, locked_nodes):
        """Between full cleanups, delete returned nodes at once: they hold quota.
        ``index``: the pass's ``NodeIndex`` (its ``used`` ids, not the whole fleet)."""
        todo = []
        for node_id in sorted(index.used):
            node = index.by_id[node_id]
            if node.id in locked_nodes:
                continue
            worker = self.providers.workers.get(node.provider)
            if worker is not None and not getattr(worker.adapter, "reuses_nodes", False):
                todo.append(node)
        self.fanout.run(self._delete_used, todo)

    def _delete_used(self, node):
        try:
            self.delete_node(node.id, "used", seen=node)
        except Exception:
            log.exception("node %s: delete failed (will retry)", node.id)

    def delete_node(self, node_id, reason, seen=None):
        """Lock the node, mark it ``deleting`` and hand it to its provider's worker.

        ``seen`` is the node as the caller's snapshot has it (not changed here): it stands in
        for the reads before and after locking, and the write is compare-and-set on its version,
        so a node changed since the snapshot is left alone and decided again next pass."""
        node = seen if seen is not None else self.store.get_node(node_id)
        if node is None:
            return
        worker = self.providers.workers.get(node.provider)
        if worker is None or worker.deleting(node_id):
            return
        try:
            lock = self.store.lock_node(node_id)
        except LockError:
            return
        try:
            node = node.copy() if seen is not None else self.store.get_node(node_id)
            if node is None or not self._still_deletable(node):
                lock.release()
                return
            # a node that was serving frees room a launch refused for quota may wait for
            frees_room = node.state in STABLE_STATES
            if node.state not in (NodeState.DELETING, NodeState.DELETED):
                node.set_state(NodeState.DELETING)
                self.store.update_node(node, check_version=True)
        except (ConflictError, NotFoundError):
            lock.release()          # changed or gone since the snapshot: next pass decides
            return
        except Exception:
            lock.release()
            raise
        log.info("node %s on %s: deleting (%s)", node.id, node.provider, reason)
        worker.submit_delete(node, lock, reason, frees_room)

    def _still_deletable(self, node):
        """Re-check a node after locking it: the plan was made from an older snapshot."""
        config = self.config()
        again = plan_node_cleanup([node], [], set(), set(), config.labels, {node.provider},
                                  config.max_hold_age, time.time(),
                                  configured_providers=set(config.providers))
        return any(isinstance(a, DeleteNode) for a in again)

    def reset_lost(self, request_id):
        """A pending request nobody holds (its launcher died): back in the queue."""
        with self.store.request_if_free(request_id) as req:
            if req is None or req.state != RequestState.PENDING:
                return
            for node in self.store.list_nodes(shared=True):
                if node.allocated_to == req.id and node.state == NodeState.READY:
                    return_to_pool(self.store, node.id, req.id, f"request {req.id} was lost")
            req.nodes = []
            req.set_state(RequestState.REQUESTED)
            self.store.update_request(req, check_version=True)
            log.warning("request %s was pending with no launcher holding it: back in the queue",
                        req.id)

    def _collect_locks(self):
        mono = time.monotonic()
        if mono - self._last_lock_gc < self.lock_gc_interval:
            return
        self._last_lock_gc = mono
        removed = self.store.remove_stale_request_locks(self.request_lock_max_age)
        if removed:
            log.info("removed %d lock directories of requests that are gone", removed)
        removed = self.store.remove_empty_nodes()
        if removed:
            log.info("removed %d empty node entries (locked by a client after their node was "
                     "deleted)", removed)
