"""The launcher's decisions, as pure functions over a snapshot of state.

Nothing here touches the store, a cloud, a clock or a thread.  The launcher builds a ``Snapshot``,
asks these functions what to do, and applies the returned actions (``launcher/launcher.py``).
Tests feed plain data in and check the actions that come out.

Request routing rules (Nodepool's, made deterministic across all of one launcher's pools):

* requests are taken in order (priority prefix, relative priority, sequence);
* a pool that can never serve a request (disabled, missing label, broken label, image not
  available, needs more than the pool's or cloud's absolute limits) declines it; when every
  registered pool has declined, the request fails;
* among this launcher's pools that can serve it, the preferred provider wins, then a pool that has
  every node ready, then the lowest priority number, then the most headroom; a better-priority
  pool of another launcher that is not paused is left to take it;
* ready unallocated nodes are assigned first (when the request allows reuse), the rest launched;
* a pool at quota *pauses*: the request stays and the pool accepts nothing after it in this pass
  (no starvation of large requests); tenant limits and max-concurrency defer without pausing.
"""
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional

from ..model.quota import Limits, Resources
from ..model.states import NodeState, RequestState

MIN_READY_REQUESTOR = "NodePool:min-ready"
MIN_READY_PRIORITY = "900"


# -- snapshot ------------------------------------------------------------------------------------

@dataclass
class PoolView:
    """What the planner knows about one pool this launcher runs."""
    pool: object                         # config.model.Pool
    pool_id: str                         # the id of its registered pool component
    label_costs: dict = field(default_factory=dict)      # label -> Resources of one node
    broken_labels: dict = field(default_factory=dict)    # label -> reason it can never be served
    unavailable_labels: dict = field(default_factory=dict)  # label -> why its image is missing
    cloud_limits: Optional[Limits] = None     # account limits (None: unknown/unlimited)
    unmanaged_usage: Resources = field(default_factory=Resources)  # cloud usage not ours
    ignore_provider_quota: bool = False
    max_concurrency: int = -1
    in_flight: int = 0                   # launches in progress for the whole provider
    launches: bool = True                # False (static hosts): only ready nodes are handed out
    slot_labels: Optional[list] = None   # static hosts: the label set of every registered slot

    @property
    def key(self):
        return self.pool.key

    @property
    def provider(self):
        return self.pool.provider

    @property
    def priority(self):
        return self.pool.priority

    def cost(self, label):
        return self.label_costs.get(label) or Resources.of(instances=1)


@dataclass
class Snapshot:
    requests: list                       # NodeRequest, in handling order
    nodes: list                          # Node
    pools: list                          # PoolView of this launcher
    registered_pools: list = field(default_factory=list)   # Component(kind="pool"), all launchers
    locked_nodes: set = field(default_factory=set)
    active_requests: set = field(default_factory=set)      # request ids this launcher handles
    tenant_limits: dict = field(default_factory=dict)      # tenant -> Limits


# -- actions -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decline:
    request_id: str
    pool_id: str
    reason: str


@dataclass(frozen=True)
class Accept:
    """Take a request in a pool: lock ``assign`` nodes (label, node_id) and launch ``launch``."""
    request_id: str
    pool_key: str
    assign: tuple = ()                   # ((label, node_id), ...)
    launch: tuple = ()                   # (label, ...)


@dataclass(frozen=True)
class FailRequest:
    """Every pool registered now has declined the request (pools that had not went away)."""
    request_id: str


@dataclass(frozen=True)
class Defer:
    """Leave a request waiting; ``pauses`` when a pool is at quota for it."""
    request_id: str
    pool_key: str
    reason: str
    pauses: bool = False


@dataclass(frozen=True)
class SubmitMinReady:
    label: str
    count: int


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


@dataclass(frozen=True)
class FinishMinReady:
    """A min-ready request is done: release its nodes into the pool and remove it."""
    request_id: str


# -- helpers -------------------------------------------------------------------------------------

def node_cost(node, pool_views_by_key):
    """Resources a node occupies: its stored ``resources``, else its label's cost."""
    if node.resources:
        return Resources(node.resources)
    pv = pool_views_by_key.get(f"{node.provider}/{node.pool}")
    if pv and node.type:
        return pv.cost(node.type[0])
    return Resources.of(instances=1)


def is_ready_unallocated(node):
    return node.state == NodeState.READY and not node.allocated_to


def _supports(component, labels):
    return set(labels) <= set(component.supported_labels or [])


# -- request routing ------------------------------------------------------------------------------

def never_reason(pv, request):
    """Why ``pv`` can never serve ``request`` (a decline reason), or None."""
    pool = pv.pool
    if pool.max_servers <= 0:
        return "pool is disabled"
    missing = sorted({lbl for lbl in request.node_types if lbl not in pool.labels})
    if missing:
        return f"node type(s) not available: {', '.join(missing)}"
    for lbl in request.node_types:
        if lbl in pv.broken_labels:
            return f"label {lbl} cannot be served: {pv.broken_labels[lbl]}"
        if lbl in pv.unavailable_labels:
            return f"image for label {lbl} not available: {pv.unavailable_labels[lbl]}"
    if pv.slot_labels is not None and not slots_could_serve(pv.slot_labels, request.node_types):
        return "the pool's registered hosts can never serve all these nodes at once"
    need = Resources.total(pv.cost(lbl) for lbl in request.node_types)
    if not pool.limits.could_ever_fit(need):
        return "it would exceed the pool's limits"
    if pv.cloud_limits is not None and not pv.ignore_provider_quota \
            and not pv.cloud_limits.could_ever_fit(need):
        return "it would exceed the cloud's quota"
    return None


def slots_could_serve(slot_labels, node_types):
    """Whether some assignment gives every requested node its own slot carrying its label
    (a bipartite matching, by augmenting paths: requests and pools are small).  Whether the
    slots are free now does not matter: this is "could ever", used to decline."""
    if len(node_types) > len(slot_labels):
        return False
    owner = {}                                 # slot index -> index of the node it serves

    def place(i, seen):
        for s, labels in enumerate(slot_labels):
            if node_types[i] in labels and s not in seen:
                seen.add(s)
                if s not in owner or place(owner[s], seen):
                    owner[s] = i
                    return True
        return False

    return all(place(i, set()) for i in range(len(node_types)))


def plan_requests(snap):
    """Decide, for every waiting request, what this launcher's pools do with it."""
    views = {pv.key: pv for pv in snap.pools}
    my_ids = {pv.pool_id for pv in snap.pools}
    pool_usage = defaultdict(Resources)
    provider_usage = defaultdict(Resources)
    tenant_usage = defaultdict(Resources)
    free_ready = defaultdict(list)        # (pool key, label) -> [node], oldest first
    for node in snap.nodes:
        if node.state == NodeState.DELETED:
            continue
        cost = node_cost(node, views)
        key = f"{node.provider}/{node.pool}"
        pool_usage[key] += cost
        provider_usage[node.provider] += cost
        if node.tenant_name:
            tenant_usage[node.tenant_name] += cost
        if is_ready_unallocated(node) and node.id not in snap.locked_nodes and len(node.type) == 1:
            free_ready[(key, node.type[0])].append(node)
    for nodes in free_ready.values():
        nodes.sort(key=lambda n: (n.state_time or 0, n.id))
    in_flight = {pv.provider: pv.in_flight for pv in snap.pools}

    actions = []
    paused = set()
    registered_ids = [c.pool_id for c in snap.registered_pools]
    for req in snap.requests:
        if req.state != RequestState.REQUESTED or req.id in snap.active_requests:
            continue
        if not req.node_types:
            continue
        if req.declined_by and request_failed(req, registered_ids):
            actions.append(FailRequest(req.id))
            continue
        mine = [pv for pv in snap.pools if pv.pool_id not in req.declined_by]
        if not mine:
            continue
        servable = []
        for pv in mine:
            reason = never_reason(pv, req)
            if reason:
                actions.append(Decline(req.id, pv.pool_id, reason))
            else:
                servable.append(pv)
        if not servable:
            continue
        others = [c for c in snap.registered_pools
                  if c.pool_id not in my_ids and c.pool_id not in req.declined_by
                  and _supports(c, req.node_types)]
        if req.provider:
            preferred = [pv for pv in servable if pv.provider == req.provider]
            if preferred:
                servable = preferred
            elif any(c.provider_name == req.provider for c in others):
                continue      # the preferred provider is served by another launcher
        best_other = min((c.priority for c in others if not c.paused), default=math.inf)

        def has_all_ready(pv):
            if not req.reuse:
                return False
            want = Counter(req.node_types)
            return all(len(free_ready[(pv.key, lbl)]) >= n for lbl, n in want.items())

        def headroom(pv):
            room = pv.pool.limits.headroom(pool_usage[pv.key]).get("instances", math.inf)
            return room

        servable.sort(key=lambda pv: (0 if has_all_ready(pv) else 1, pv.priority,
                                      -headroom(pv), pv.key))
        for pv in servable:
            if pv.priority > best_other:
                break         # a better pool of another launcher will take it
            if pv.key in paused:
                continue
            if pv.max_concurrency == 0:
                continue
            decision = _try_pool(pv, req, free_ready, pool_usage, provider_usage,
                                 tenant_usage, in_flight, snap.tenant_limits)
            actions.append(decision)
            if isinstance(decision, Accept):
                break
            if decision.pauses:
                paused.add(pv.key)
            if decision.reason.startswith("tenant"):
                break         # tenant limits are global: no other pool can help
    return actions


def _try_pool(pv, req, free_ready, pool_usage, provider_usage, tenant_usage, in_flight,
              tenant_limits):
    """Accept ``req`` in ``pv`` if it fits now; else a Defer saying why."""
    assign = []
    launch = []
    taken = defaultdict(int)
    for lbl in req.node_types:
        candidates = free_ready[(pv.key, lbl)] if req.reuse else []
        if req.reuse and taken[lbl] < len(candidates):
            node = candidates[taken[lbl]]
            taken[lbl] += 1
            assign.append((lbl, node.id))
        else:
            launch.append(lbl)
    need = Resources.total(pv.cost(lbl) for lbl in launch)
    is_min_ready = req.requestor == MIN_READY_REQUESTOR
    if launch and not pv.launches:
        # a pool of registered hosts waits for one to be free; it never pauses (one busy or
        # dead host must not hold up the pool's other labels)
        return Defer(req.id, pv.key, f"no free registered node for {', '.join(sorted(set(launch)))}")
    if launch:
        if req.tenant_name and req.tenant_name in tenant_limits:
            if not tenant_limits[req.tenant_name].fits(tenant_usage[req.tenant_name], need):
                return Defer(req.id, pv.key, f"tenant {req.tenant_name} is at its resource limit")
        if pv.max_concurrency > 0 and in_flight.get(pv.provider, 0) + len(launch) > pv.max_concurrency:
            return Defer(req.id, pv.key, "provider is at max-concurrency")
        if not pv.pool.limits.fits(pool_usage[pv.key], need):
            return Defer(req.id, pv.key, "pool is at its limits", pauses=not is_min_ready)
        if pv.cloud_limits is not None and not pv.ignore_provider_quota:
            used = provider_usage[pv.provider] + pv.unmanaged_usage
            if not pv.cloud_limits.fits(used, need):
                return Defer(req.id, pv.key, "provider is at cloud quota", pauses=not is_min_ready)
    # commit the tallies so later requests in this pass see them
    for lbl, n in taken.items():
        del free_ready[(pv.key, lbl)][:n]
    pool_usage[pv.key] += need
    provider_usage[pv.provider] += need
    if req.tenant_name:
        tenant_usage[req.tenant_name] += need
    in_flight[pv.provider] = in_flight.get(pv.provider, 0) + len(launch)
    return Accept(req.id, pv.key, tuple(assign), tuple(launch))


def fits_now(pv, labels, nodes):
    """Whether launching ``labels`` in ``pv``'s pool stays within the pool's limits and the
    cloud's quota, given every node record there is now (checked again under the pool lock,
    so launchers racing for the last slots cannot both take them)."""
    views = {pv.key: pv}
    need = Resources.total(pv.cost(lbl) for lbl in labels)
    pool_used = Resources.total(node_cost(n, views) for n in nodes
                                if n.provider == pv.provider and n.pool == pv.pool.name
                                and n.state != NodeState.DELETED)
    if not pv.pool.limits.fits(pool_used, need):
        return False
    if pv.cloud_limits is not None and not pv.ignore_provider_quota:
        prov_used = Resources.total(node_cost(n, views) for n in nodes
                                    if n.provider == pv.provider
                                    and n.state != NodeState.DELETED) + pv.unmanaged_usage
        if not pv.cloud_limits.fits(prov_used, need):
            return False
    return True


def request_failed(request, registered_pool_ids):
    """True when every registered pool has declined the request (so it can never be served)."""
    return bool(registered_pool_ids) and set(registered_pool_ids) <= set(request.declined_by)


# -- min-ready -----------------------------------------------------------------------------------

def plan_min_ready(labels, nodes, requests, servable_labels):
    """How many min-ready requests to submit per label.

    ``labels``: config labels; ``servable_labels``: labels some registered pool supports and whose
    image is available somewhere.  Ready unallocated nodes and outstanding min-ready requests (of
    any launcher) both count towards the target, so several launchers do not overshoot.
    """
    ready = Counter()
    for node in nodes:
        if is_ready_unallocated(node) and len(node.type) == 1:
            ready[node.type[0]] += 1
    pending = Counter()
    for req in requests:
        # a fulfilled min-ready request's node is still allocated to it until it is finished
        if req.requestor == MIN_READY_REQUESTOR and req.state in (
                RequestState.REQUESTED, RequestState.PENDING, RequestState.FULFILLED) \
                and len(req.node_types) == 1:
            pending[req.node_types[0]] += 1
    actions = []
    for name, label in sorted(labels.items()):
        if label.min_ready <= 0 or name not in servable_labels:
            continue
        short = label.min_ready - ready[name] - pending[name]
        if short > 0:
            actions.append(SubmitMinReady(name, short))
    return actions


# -- cleanup -------------------------------------------------------------------------------------

# ``deleted`` is written just before the record is removed: one still there is a delete whose
# last step failed (a store error, a crash), finished like any other unlocked delete
ABANDONED_STATES = (NodeState.INIT, NodeState.BUILDING, NodeState.FAILED, NodeState.ABORTED,
                    NodeState.IN_USE, NodeState.USED, NodeState.DELETING, NodeState.TESTING,
                    NodeState.DELETED)


def plan_node_cleanup(nodes, requests, locked_nodes, locked_requests, labels, providers,
                      max_hold_age, now, reusable_providers=()):
    """Which nodes to delete or release, and which lost requests to reset.

    Only nodes of ``providers`` (the providers this launcher runs) are touched.  A node that
    somebody holds locked is never touched.  ``reusable_providers`` return used nodes to ready
    (static hosts) instead of deleting them.
    """
    actions = []
    request_ids = {r.id for r in requests}
    for node in nodes:
        if node.provider not in providers or node.id in locked_nodes:
            continue
        state = node.state
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
        elif req.requestor == MIN_READY_REQUESTOR and req.state in (
                RequestState.FULFILLED, RequestState.FAILED) and req.id not in locked_requests:
            actions.append(FinishMinReady(req.id))
    return actions


# -- leaked instances ----------------------------------------------------------------------------

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


def unmanaged_usage(provider_name, instances, nodes):
    """Cloud usage not accounted to this provider's node records (other tools, leaks)."""
    ours = {n.external_id for n in nodes if n.provider == provider_name and n.external_id}
    total = Resources()
    for inst in instances:
        if inst.deleted or inst.external_id in ours:
            continue
        total += inst.resources or Resources.of(instances=1)
    return total
