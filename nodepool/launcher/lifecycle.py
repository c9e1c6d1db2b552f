"""The life of a request this launcher accepted, decided as a pure function over a snapshot.

Once a pool accepts a request, the launcher holds the request's lock and the locks of the nodes
it assigned or launched for it.  Every pass, ``plan_held`` looks at what the store says (the
request, those nodes), at what only this process knows (which of those locks are still ours,
which launches its provider worker is still running, which labels are backing off after a
refusal) and at the pool (gone after a reload?), and returns the actions that move the request
towards its end:

    accepted ──► launching ──► all nodes ready ──► Fulfil ──► Done (locks released)
        │  ▲          │
        │  └─ Launch ◄┘ a slot is open (quota abort, a node that vanished, a lost launch)
        │             │
        └─────────────┴──► GiveBack (a node failed for good, the provider was removed):
                           the request is declined by this pool (failed when every pool has),
                           ready nodes go back to the pool, launches finish as unallocated stock

and when the request is gone (requestor left), changed hands (our lock went with our session,
a compare-and-set lost) or was ended by someone else: LetGo, nodes as above.

Nothing here touches the store, a cloud, a clock or a thread.  The invariant that matters
(tested with hypothesis): a request we hold always gets an action that ends it or makes
progress, or waits on something that will finish by itself (a running launch, a backoff).
"""
from dataclasses import dataclass, field
from typing import Optional

from ..model.states import NodeState, RequestState
from .matching import match_labels
from .reasons import Reason, Why

LAUNCHING_STATES = (NodeState.INIT, NodeState.BUILDING)


# -- what the launcher knows that the store does not ----------------------------------------------

@dataclass(frozen=True)
class HeldView:
    """One held request, as facts of this process (rebuilt every pass)."""
    request_id: str
    request: object                      # our own last copy of the request (read/written by us)
    holds_request: bool                  # the request lock is still ours (no lost session/CAS)
    nodes: tuple = ()                    # ((node id, lock still ours), ...)
    in_flight: frozenset = frozenset()   # node ids whose launch our provider worker still runs
    blocked_labels: frozenset = frozenset()   # labels backing off after a refusal in this pool
    pool_present: bool = True            # the pool is still in the running configuration


# -- actions --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Forget:
    """Our lock on this node went with our session: drop it from memory, write nothing."""
    node_id: str


@dataclass(frozen=True)
class Verify:
    """The node is not in the snapshot (a cache may lag): read the store before judging."""
    node_id: str


@dataclass(frozen=True)
class Discard:
    """A node of ours that will not serve (failed, quota-aborted, launch lost): delete it."""
    node_id: str
    reason: str


@dataclass(frozen=True)
class ReturnNode:
    """A ready node of ours goes back to the pool unallocated, and its lock is released."""
    node_id: str


@dataclass(frozen=True)
class Launch:
    """Launch nodes for these open slots (room is checked again under the pool lock)."""
    request_id: str
    labels: tuple


@dataclass(frozen=True)
class Fulfil:
    request_id: str
    node_ids: tuple                      # in the order of the request's node types


@dataclass(frozen=True)
class GiveBack:
    """Decline the request in this pool (it fails when every pool has declined)."""
    request_id: str
    reason: Reason


@dataclass(frozen=True)
class LetGo:
    """Release the request lock without writing the request."""
    request_id: str
    why: str


@dataclass(frozen=True)
class Done:
    """Fulfilled: release the remaining locks (the nodes are the requestor's now) and forget."""
    request_id: str


@dataclass(frozen=True)
class Drop:
    """Nothing of this request is held any more: forget it."""
    request_id: str


@dataclass(frozen=True)
class Wait:
    request_id: str
    reason: Reason


# -- the decision ---------------------------------------------------------------------------------

def plan_held(held, current, nodes_by_id):
    """Actions for one held request.

    ``held``: HeldView; ``current``: the request as the snapshot has it (None: gone);
    ``nodes_by_id``: the snapshot's nodes.
    """
    rid = held.request_id
    actions = [Forget(nid) for nid, ours in held.nodes if not ours]
    ours = [nid for nid, mine in held.nodes if mine]
    missing = [nid for nid in ours if nid not in nodes_by_id]
    if missing:
        return actions + [Verify(nid) for nid in missing]
    nodes = [nodes_by_id[nid] for nid in ours]
    req = held.request

    if current is not None and current.state == RequestState.FULFILLED \
            and set(current.nodes) >= set(ours):
        return actions + [Done(rid)]
    owned = (held.holds_request and current is not None and req is not None
             and current.state in (RequestState.REQUESTED, RequestState.PENDING))
    if not owned:
        if held.holds_request:
            actions.append(LetGo(rid, "the request is gone" if current is None
                                 else f"the request is {current.state.value}"))
        return actions + _finish_nodes(rid, nodes, held.in_flight)

    failed = [n for n in nodes if n.state == NodeState.FAILED]
    if failed or not held.pool_present:
        reason = (Reason(Why.PROVIDER_REMOVED) if not held.pool_present else
                  Reason(Why.LAUNCH_FAILED, failed[0].extra.get("failure_reason", "")))
        return actions + [GiveBack(rid, reason)] + _finish_nodes(rid, nodes, held.in_flight)

    live = []
    blocked = set(held.blocked_labels)
    for node in nodes:
        if node.state == NodeState.ABORTED and node.type:
            blocked.add(node.type[0])     # the cloud just refused it: the label backs off first
        if node.state in LAUNCHING_STATES and node.id not in held.in_flight:
            actions.append(Discard(node.id, "its launch is no longer running"))
        elif node.state in LAUNCHING_STATES or node.state == NodeState.READY:
            live.append(node)
        else:
            actions.append(Discard(node.id, f"{node.state.value} while launching for "
                                            f"request {rid}"))
    slots = match_labels(req.node_types, [n.type or [] for n in live])
    used = set(slots.values())
    for i, node in enumerate(live):
        if i not in used:      # serves no requested label (the request's labels changed?)
            actions.append(ReturnNode(node.id) if node.state == NodeState.READY
                           else Discard(node.id, f"not needed by request {rid}"))
    open_labels = [lbl for pos, lbl in enumerate(req.node_types) if pos not in slots]
    if open_labels:
        launchable = tuple(lbl for lbl in open_labels if lbl not in blocked)
        if launchable:
            actions.append(Launch(rid, launchable))
        if len(launchable) < len(open_labels):
            waiting = sorted(set(open_labels) - set(launchable))
            actions.append(Wait(rid, Reason(Why.BACKOFF, ", ".join(waiting))))
        return actions
    chosen = [live[slots[pos]] for pos in range(len(req.node_types))]
    if all(n.state == NodeState.READY for n in chosen):
        actions.append(Fulfil(rid, tuple(n.id for n in chosen)))
    else:
        actions.append(Wait(rid, Reason(Why.LAUNCHING)))
    return actions


def _finish_nodes(rid, nodes, in_flight):
    """The request is let go: ready nodes return to the pool, launches still running are waited
    for (they become stock when they end), everything else is deleted."""
    actions = []
    waiting = False
    for node in nodes:
        if node.state in LAUNCHING_STATES and node.id in in_flight:
            waiting = True
        elif node.state == NodeState.READY:
            actions.append(ReturnNode(node.id))
        else:
            actions.append(Discard(node.id, f"{node.state.value}, request {rid} let go"))
    if not waiting:
        actions.append(Drop(rid))
    return actions


@dataclass
class Held:
    """The launcher's working record of one held request: the locks it holds (real resources
    of its session) and its own last copy of the request, whose version guards every write."""
    request_id: str
    pool_key: str
    pool_id: str
    lock: object                          # the request lock
    request: object                       # last copy read or written under that lock
    node_locks: dict = field(default_factory=dict)    # node id -> Lock, in assignment order
    lost: bool = False                    # a compare-and-set write lost: the request changed hands
    let_go: bool = False                  # the request lock was released (finishing launches)
    open_slots: bool = False              # last pass: slots waiting for room or a backoff
    az: Optional[str] = None
    launched: int = 0                     # nodes launched for it (0 at fulfilment: a warm hit)
    # ready nodes assigned to it whose allocation is written together with the fulfilment
    # (node id -> the assigned copy): a warm hit is one write, and one round trip
    unwritten: dict = field(default_factory=dict)
