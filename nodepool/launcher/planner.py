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
import bisect
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional

from ..model.quota import Limits, Resources
from ..model.states import NodeState, RequestState
from .matching import can_match_all, match_labels
from .reasons import Reason, Why

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
    down: Optional[str] = None           # the provider cannot be used (why), e.g. it cannot start
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
    backoff: set = field(default_factory=set)   # (pool key, label) waiting after a refusal
    fleet: Optional["Fleet"] = None      # tallies carried between passes, updated to ``nodes``


# -- actions -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decline:
    request_id: str
    pool_id: str
    reason: Reason


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
    reason: Reason
    pauses: bool = False


# -- helpers -------------------------------------------------------------------------------------

def node_cost(node, pool_views_by_key):
    """Resources a node occupies: its stored ``resources``, else its label's cost."""
    if node.resources:
        return node.resources            # read only: callers add it to their own tallies
    pv = pool_views_by_key.get(f"{node.provider}/{node.pool}")
    if pv and node.type:
        return pv.cost(node.type[0])
    return Resources.of(instances=1)


def is_ready_unallocated(node):
    return node.state == NodeState.READY and not node.allocated_to


def _supports(component, labels):
    return set(labels) <= set(component.supported_labels or [])


# -- request routing ------------------------------------------------------------------------------

def never_reason(pv, node_types):
    """Why ``pv`` can never serve a request for ``node_types`` (a decline ``Reason``), or None."""
    pool = pv.pool
    if pool.max_servers <= 0:
        return Reason(Why.POOL_DISABLED)
    missing = sorted({lbl for lbl in node_types if lbl not in pool.labels})
    if missing:
        return Reason(Why.LABEL_MISSING, ", ".join(missing))
    if pv.down:
        return Reason(Why.PROVIDER_DOWN, pv.down)
    for lbl in node_types:
        if lbl in pv.broken_labels:
            return Reason(Why.LABEL_BROKEN, pv.broken_labels[lbl], lbl)
        if lbl in pv.unavailable_labels:
            return Reason(Why.IMAGE_MISSING, pv.unavailable_labels[lbl], lbl)
    if pv.slot_labels is not None and not can_match_all(node_types, pv.slot_labels):
        return Reason(Why.SLOTS_NEVER)
    need = Resources.total(pv.cost(lbl) for lbl in node_types)
    if not pool.limits.could_ever_fit(need):
        return Reason(Why.POOL_LIMITS_EVER)
    if pv.cloud_limits is not None and not pv.ignore_provider_quota \
            and not pv.cloud_limits.could_ever_fit(need):
        return Reason(Why.QUOTA_EVER)
    return None


def launchable_now(pv, label):
    """Whether ``pv`` could launch a node of ``label`` at all now (min-ready asks only for
    such labels: asking for one no pool can launch is a request declined, failed and asked
    again every pass)."""
    return pv.launches and never_reason(pv, [label]) is None


def _costs_key(views):
    return tuple(sorted((k, id(v.label_costs)) for k, v in views.items()))


class Fleet:
    """Usage tallies (per pool, provider and tenant) and the free ready nodes of a snapshot,
    carried from one pass to the next.  Only records that changed are counted again: stores
    replace a changed record and never change one in place, so identity tells.  A pass with
    a few changes then costs one look at each record instead of a recount of the fleet."""

    def __init__(self):
        self._seen = {}            # node id -> (record, pool key, cost, in free index)
        self._costs_key = None
        self._position = None      # position in the NodeIndex's changes (catch_up)
        self.pool_usage = defaultdict(Resources)
        self.provider_usage = defaultdict(Resources)
        self.tenant_usage = defaultdict(Resources)
        self.free = defaultdict(list)     # (pool key, label) -> [node], oldest first
        self.ready = Counter()            # label -> free ready nodes of that one label

    def update(self, nodes, views):
        """Bring the tallies to ``nodes`` (the full current list); ``views``: pool key ->
        PoolView (label costs for nodes that carry no resources of their own)."""
        costs_key = _costs_key(views)
        if costs_key != self._costs_key:
            self.__init__()
            self._costs_key = costs_key
        present = set()
        for node in nodes:
            present.add(node.id)
            old = self._seen.get(node.id)
            if old is not None:
                if old[0] is node:
                    continue
                self._remove(node.id, old)
            self._add(node, views)
        for node_id in [i for i in self._seen if i not in present]:
            self._remove(node_id, self._seen[node_id])
        return self

    def catch_up(self, index, views):
        """Bring the tallies to a ``NodeIndex``, looking only at the records that changed in
        it since the last call (everything when the label costs changed)."""
        since = self._position if _costs_key(views) == self._costs_key else None
        position, changes = index.changed_since(since)
        if changes is None:
            self.update(index.by_id.values(), views)
        else:
            for node_id, node in changes.items():
                old = self._seen.get(node_id)
                if old is not None:
                    if old[0] is node:
                        continue
                    self._remove(node_id, old)
                if node is not None:
                    self._add(node, views)
        self._position = position
        return self

    def _add(self, node, views):
        if node.state == NodeState.DELETED:
            self._seen[node.id] = (node, None, None, False)
            return
        key = f"{node.provider}/{node.pool}"
        cost = node_cost(node, views)
        self.pool_usage[key] += cost
        self.provider_usage[node.provider] += cost
        if node.tenant_name:
            self.tenant_usage[node.tenant_name] += cost
        free = is_ready_unallocated(node)
        if free:
            for label in node.type or []:
                bisect.insort(self.free[(key, label)], node, key=_age)
            if len(node.type) == 1:
                self.ready[node.type[0]] += 1
        self._seen[node.id] = (node, key, cost, free)

    def _remove(self, node_id, entry):
        node, key, cost, free = entry
        del self._seen[node_id]
        if key is None:
            return
        self.pool_usage[key] -= cost
        self.provider_usage[node.provider] -= cost
        if node.tenant_name:
            self.tenant_usage[node.tenant_name] -= cost
        if free:
            if len(node.type) == 1:
                self.ready[node.type[0]] -= 1
            for label in node.type or []:
                nodes = self.free[(key, label)]
                i = bisect.bisect_left(nodes, _age(node), key=_age)
                while i < len(nodes) and nodes[i] is not node:
                    i += 1
                if i < len(nodes):
                    del nodes[i]

    def usage_copies(self):
        """Per-pass copies of the tallies (a pass counts its own accepts into them)."""
        return tuple(defaultdict(Resources, {k: Resources(v) for k, v in d.items()})
                     for d in (self.pool_usage, self.provider_usage, self.tenant_usage))


def _age(node):
    return (node.state_time or 0, node.id)


class FreeNodes:
    """The fleet's free ready nodes as one pass sees them: each handed out at most once in the
    pass, never one somebody holds locked.  A node with several labels (a static host) can
    serve any one of them."""

    def __init__(self, fleet, locked=frozenset()):
        self._by_label = fleet.free
        self._locked = locked
        self._taken = set()

    def _first_free(self, pool_key, label, count):
        out = []
        for node in self._by_label.get((pool_key, label), ()):
            if node.id not in self._taken and node.id not in self._locked:
                out.append(node)
                if len(out) == count:
                    break
        return out

    def pick(self, pool_key, node_types):
        """``{position: node}`` serving as many of ``node_types`` as free nodes allow, oldest
        nodes first.  Each label looks at most ``len(node_types)`` candidates deep: the other
        positions can use no more than that many, so the matching finds a full cover whenever
        one exists."""
        candidates = {}
        for label in dict.fromkeys(node_types):
            for node in self._first_free(pool_key, label, len(node_types)):
                candidates.setdefault(node.id, node)
        cands = list(candidates.values())
        match = match_labels(list(node_types), [n.type for n in cands])
        return {pos: cands[c] for pos, c in match.items()}

    def take(self, nodes):
        self._taken.update(n.id for n in nodes)


def plan_requests(snap):
    """Decide, for every waiting request, what this launcher's pools do with it."""
    if not any(req.state == RequestState.REQUESTED and req.id not in snap.active_requests
               and req.node_types for req in snap.requests):
        return []                         # nothing to route: the fleet need not be tallied
    views = {pv.key: pv for pv in snap.pools}
    my_ids = {pv.pool_id for pv in snap.pools}
    fleet = snap.fleet if snap.fleet is not None else Fleet().update(snap.nodes, views)
    pool_usage, provider_usage, tenant_usage = fleet.usage_copies()
    free_ready = FreeNodes(fleet, snap.locked_nodes)
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
            reason = never_reason(pv, req.node_types)
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

        picks = {pv.key: free_ready.pick(pv.key, req.node_types) if req.reuse else {}
                 for pv in servable}

        def has_all_ready(pv):
            return len(picks[pv.key]) == len(req.node_types)

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
            decision = _try_pool(pv, req, picks[pv.key], free_ready, pool_usage, provider_usage,
                                 tenant_usage, in_flight, snap.tenant_limits, snap.backoff)
            actions.append(decision)
            if isinstance(decision, Accept):
                break
            if decision.pauses:
                paused.add(pv.key)
            if decision.reason.kind.global_limit:
                break         # tenant limits are global: no other pool can help
    return actions


def _try_pool(pv, req, pick, free_ready, pool_usage, provider_usage, tenant_usage, in_flight,
              tenant_limits, backoff=frozenset()):
    """Accept ``req`` in ``pv`` if it fits now; else a Defer saying why.  ``pick`` maps request
    positions to the free ready nodes that would serve them."""
    assign = [(lbl, pick[pos].id) for pos, lbl in enumerate(req.node_types) if pos in pick]
    launch = [lbl for pos, lbl in enumerate(req.node_types) if pos not in pick]
    need = Resources.total(pv.cost(lbl) for lbl in launch)
    is_min_ready = req.requestor == MIN_READY_REQUESTOR
    if launch and not pv.launches:
        # a pool of registered hosts waits for one to be free; it never pauses (one busy or
        # dead host must not hold up the pool's other labels)
        return Defer(req.id, pv.key, Reason(Why.NO_FREE_SLOT, ", ".join(sorted(set(launch)))))
    if launch:
        waiting = sorted({lbl for lbl in launch if (pv.key, lbl) in backoff})
        if waiting:
            # the cloud refused this label for quota or capacity a moment ago
            return Defer(req.id, pv.key, Reason(Why.BACKOFF, ", ".join(waiting)),
                         pauses=not is_min_ready)
        if req.tenant_name and req.tenant_name in tenant_limits:
            if not tenant_limits[req.tenant_name].fits(tenant_usage[req.tenant_name], need):
                return Defer(req.id, pv.key, Reason(Why.TENANT_LIMIT, req.tenant_name))
        if pv.max_concurrency > 0 and in_flight.get(pv.provider, 0) + len(launch) > pv.max_concurrency:
            return Defer(req.id, pv.key, Reason(Why.MAX_CONCURRENCY))
        if not pv.pool.limits.fits(pool_usage[pv.key], need):
            return Defer(req.id, pv.key, Reason(Why.POOL_FULL), pauses=not is_min_ready)
        if pv.cloud_limits is not None and not pv.ignore_provider_quota:
            used = provider_usage[pv.provider] + pv.unmanaged_usage
            if not pv.cloud_limits.fits(used, need):
                return Defer(req.id, pv.key, Reason(Why.QUOTA_NOW), pauses=not is_min_ready)
    # commit the tallies so later requests in this pass see them
    free_ready.take(pick.values())
    pool_usage[pv.key] += need
    provider_usage[pv.provider] += need
    if req.tenant_name:
        tenant_usage[req.tenant_name] += need
    in_flight[pv.provider] = in_flight.get(pv.provider, 0) + len(launch)
    return Accept(req.id, pv.key, tuple(assign), tuple(launch))


class Room:
    """What one pool may still launch, counted from every node record there is now (under
    the pool lock, so launchers racing for the last slots cannot both take them); each
    ``take`` that fits is counted against what is left.  ``fleet``: tallies already brought
    up to date with those records (else they are counted from ``nodes``)."""

    def __init__(self, pv, nodes=(), fleet=None):
        if fleet is None:
            fleet = Fleet().update(nodes, {pv.key: pv})
        self.pv = pv
        self.pool_used = Resources(fleet.pool_usage.get(pv.key, {}))
        self.provider_used = Resources(fleet.provider_usage.get(pv.provider, {}))
        self.provider_used += pv.unmanaged_usage

    def take(self, labels):
        pv = self.pv
        need = Resources.total(pv.cost(lbl) for lbl in labels)
        if not pv.pool.limits.fits(self.pool_used, need):
            return False
        if pv.cloud_limits is not None and not pv.ignore_provider_quota \
                and not pv.cloud_limits.fits(self.provider_used, need):
            return False
        self.pool_used += need
        self.provider_used += need
        return True


def fits_now(pv, labels, nodes):
    """Whether launching ``labels`` in ``pv``'s pool stays within the pool's limits and the
    cloud's quota, given every node record there is now."""
    return Room(pv, nodes).take(labels)


def request_failed(request, registered_pool_ids):
    """True when every registered pool has declined the request (so it can never be served)."""
    return bool(registered_pool_ids) and set(registered_pool_ids) <= set(request.declined_by)
