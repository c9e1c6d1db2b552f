"""The launcher's decisions: plain data in, actions out.  No threads, no store, no clock."""
import math
from collections import Counter

from hypothesis import given, settings, strategies as st

from nodepool.config.model import Label, Pool, PoolLabel
from nodepool.drivers.base import Instance, META_NODE_ID, META_PROVIDER
from nodepool.launcher import cleanup as cleanup_plan, minready, planner
from nodepool.launcher.cleanup import Deallocate, DeleteNode, ResetLostRequest
from nodepool.launcher.minready import SubmitMinReady
from nodepool.launcher.nodeindex import NodeIndex
from nodepool.launcher.planner import Accept, Decline, Defer, PoolView, Snapshot
from nodepool.launcher.reasons import Reason, Why
from nodepool.model import Component, Limits, Node, NodeRequest, Resources


def pool(name="main", provider="sim", labels=("small",), max_servers=math.inf, priority=100,
         **kw):
    p = Pool(name=name, provider=provider, max_servers=max_servers, priority=priority, **kw)
    p.labels = {lbl: PoolLabel(name=lbl, pool=name, provider=provider) for lbl in labels}
    return p


def view(p, pool_id=None, **kw):
    return PoolView(pool=p, pool_id=pool_id or f"id-{p.key}", **kw)


def comp(v, paused=False):
    return Component(kind="pool", pool_id=v.pool_id, provider_name=v.provider,
                     supported_labels=sorted(v.pool.labels), priority=v.priority, paused=paused)


def req(rid, labels, **kw):
    return NodeRequest(id=rid, node_types=list(labels), **kw)


def node(nid, label="small", state="ready", provider="sim", pool_name="main", **kw):
    return Node(id=nid, type=[label], state=state, provider=provider, pool=pool_name,
                state_time=kw.pop("state_time", 1000.0), **kw)


def snap(requests, nodes=(), views=(), others=(), **kw):
    views = list(views)
    return Snapshot(requests=list(requests), nodes=list(nodes), pools=views,
                    registered_pools=[comp(v) for v in views] + list(others), **kw)


def only(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


# -- request routing -------------------------------------------------------------------------------

def test_ready_node_is_assigned_before_launching():
    v = view(pool())
    actions = planner.plan_requests(snap([req("100-1", ["small", "small"])],
                                         [node("1")], [v]))
    assert actions == [Accept("100-1", "sim/main", (("small", "1"),), ("small",))]


def test_requests_taken_in_priority_then_relative_priority_then_sequence_order():
    v = view(pool(max_servers=1))
    reqs = sorted([req("200-0000000001", ["small"]),
                   req("100-0000000003", ["small"], relative_priority=1),
                   req("100-0000000002", ["small"], relative_priority=1),
                   req("100-0000000004", ["small"])], key=NodeRequest.sort_key)
    actions = planner.plan_requests(snap(reqs, [], [v]))
    accepted = only(actions, Accept)
    assert [a.request_id for a in accepted] == ["100-0000000004"]
    deferred = only(actions, Defer)
    assert deferred[0].request_id == "100-0000000002" and deferred[0].pauses


def test_pool_at_quota_pauses_and_does_not_take_later_requests():
    v = view(pool(max_servers=2))
    nodes = [node("1", state="in-use"), node("2", state="building")]
    reqs = [req("100-1", ["small"]), req("100-2", ["small"])]
    actions = planner.plan_requests(snap(reqs, nodes, [v]))
    assert not only(actions, Accept)
    assert not only(actions, Decline)
    assert only(actions, Defer)[0].pauses


def test_request_that_can_never_fit_is_declined_not_paused():
    v = view(pool(max_servers=1))
    actions = planner.plan_requests(snap([req("100-1", ["small", "small"])], [], [v]))
    assert actions == [Decline("100-1", v.pool_id, Reason(Why.POOL_LIMITS_EVER))]


def test_unknown_label_is_declined_by_every_pool():
    a = view(pool("a"))
    b = view(pool("b"))
    actions = planner.plan_requests(snap([req("100-1", ["nope"])], [], [a, b]))
    assert {d.pool_id for d in only(actions, Decline)} == {a.pool_id, b.pool_id}
    assert all("not available" in str(d.reason) for d in actions)


def test_request_failed_only_when_every_registered_pool_declined():
    r = req("100-1", ["x"], declined_by=["p1"])
    assert not planner.request_failed(r, ["p1", "p2"])
    r.declined_by.append("p2")
    assert planner.request_failed(r, ["p1", "p2"])
    assert not planner.request_failed(r, [])


def test_already_declined_pool_does_not_consider_it_again():
    v = view(pool())
    other = Component(kind="pool", pool_id="other", provider_name="sim2",
                      supported_labels=["small"], priority=100)
    actions = planner.plan_requests(snap([req("100-1", ["small"], declined_by=[v.pool_id])],
                                         [], [v], [other]))
    assert actions == []


def test_disabled_pool_declines():
    v = view(pool(max_servers=0))
    actions = planner.plan_requests(snap([req("100-1", ["small"])], [], [v]))
    assert actions == [Decline("100-1", v.pool_id, Reason(Why.POOL_DISABLED))]


def test_cloud_quota_including_unmanaged_usage_pauses():
    v = view(pool(), cloud_limits=Limits(instances=2), unmanaged_usage=Resources.of(instances=1))
    nodes = [node("1", state="in-use")]
    actions = planner.plan_requests(snap([req("100-1", ["small"])], nodes, [v]))
    assert actions == [Defer("100-1", "sim/main", Reason(Why.QUOTA_NOW), pauses=True)]


def test_ignore_provider_quota():
    v = view(pool(), cloud_limits=Limits(instances=1), ignore_provider_quota=True)
    actions = planner.plan_requests(snap([req("100-1", ["small"])], [node("1", state="in-use")],
                                         [v]))
    assert only(actions, Accept)


def test_cores_and_ram_limits_use_label_costs():
    p = pool(max_cores=8)
    v = view(p, label_costs={"small": Resources.of(cores=4, ram=4096)})
    reqs = [req("100-1", ["small"]), req("100-2", ["small"]), req("100-3", ["small"])]
    actions = planner.plan_requests(snap(reqs, [], [v]))
    assert [a.request_id for a in only(actions, Accept)] == ["100-1", "100-2"]
    assert only(actions, Defer)[0].request_id == "100-3"


def test_tenant_limit_defers_without_pausing():
    v = view(pool())
    nodes = [node("1", state="in-use", tenant_name="t1")]
    reqs = [req("100-1", ["small"], tenant_name="t1"), req("100-2", ["small"], tenant_name="t2")]
    actions = planner.plan_requests(snap(reqs, nodes, [v],
                                         tenant_limits={"t1": Limits(instances=1)}))
    assert only(actions, Defer)[0].request_id == "100-1"
    assert not only(actions, Defer)[0].pauses
    assert [a.request_id for a in only(actions, Accept)] == ["100-2"]


def test_max_concurrency():
    v = view(pool(), max_concurrency=1, in_flight=1)
    actions = planner.plan_requests(snap([req("100-1", ["small"])], [], [v]))
    assert actions == [Defer("100-1", "sim/main", Reason(Why.MAX_CONCURRENCY))]
    v0 = view(pool(), max_concurrency=0)
    assert planner.plan_requests(snap([req("100-1", ["small"])], [], [v0])) == []


def test_ready_node_reused_only_when_request_allows_reuse():
    v = view(pool())
    actions = planner.plan_requests(snap([req("900-1", ["small"], reuse=False)],
                                         [node("1")], [v]))
    assert actions == [Accept("900-1", "sim/main", (), ("small",))]


def test_locked_or_allocated_ready_nodes_are_not_assigned():
    v = view(pool())
    nodes = [node("1"), node("2", allocated_to="100-9")]
    actions = planner.plan_requests(snap([req("100-1", ["small"])], nodes, [v],
                                         locked_nodes={"1"}))
    assert actions == [Accept("100-1", "sim/main", (), ("small",))]


def test_one_ready_node_is_never_given_to_two_requests():
    v = view(pool())
    actions = planner.plan_requests(snap([req("100-1", ["small"]), req("100-2", ["small"])],
                                         [node("1")], [v]))
    assert [a.assign for a in only(actions, Accept)] == [(("small", "1"),), ()]


def test_pool_with_ready_nodes_preferred_then_priority():
    a = view(pool("a", priority=100))
    b = view(pool("b", priority=50))
    nodes = [node("1", pool_name="a")]
    actions = planner.plan_requests(snap([req("100-1", ["small"])], nodes, [a, b]))
    assert actions == [Accept("100-1", "sim/a", (("small", "1"),), ())]
    actions = planner.plan_requests(snap([req("100-1", ["small"])], [], [a, b]))
    assert actions == [Accept("100-1", "sim/b", (), ("small",))]


def test_better_pool_of_another_launcher_is_left_to_take_it():
    mine = view(pool("a", priority=100))
    other = Component(kind="pool", pool_id="other", provider_name="sim2",
                      supported_labels=["small"], priority=10)
    actions = planner.plan_requests(snap([req("100-1", ["small"])], [], [mine], [other]))
    assert actions == []
    other.paused = True
    actions = planner.plan_requests(snap([req("100-1", ["small"])], [], [mine], [other]))
    assert only(actions, Accept)


def test_preferred_provider():
    a = view(pool("a", provider="p1"))
    b = view(pool("b", provider="p2"))
    actions = planner.plan_requests(snap([req("100-1", ["small"], provider="p2")], [], [a, b]))
    assert actions == [Accept("100-1", "p2/b", (), ("small",))]


def test_missing_image_declines_with_reason():
    v = view(pool(), unavailable_labels={"small": "no ready upload"})
    actions = planner.plan_requests(snap([req("100-1", ["small"])], [], [v]))
    assert len(actions) == 1 and "no ready upload" in str(actions[0].reason)
    assert actions[0].reason.kind is Why.IMAGE_MISSING and actions[0].reason.label == "small"


def test_active_and_non_requested_requests_are_skipped():
    v = view(pool())
    reqs = [req("100-1", ["small"], state="pending"), req("100-2", ["small"])]
    assert planner.plan_requests(snap(reqs, [], [v], active_requests={"100-2"})) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.integers(1, 3)), max_size=12),
       st.integers(0, 6), st.integers(0, 5))
def test_accepted_launches_never_exceed_max_servers(reqs, max_servers, existing):
    v = view(pool(labels=("a", "b"), max_servers=max_servers))
    nodes = [node(str(i), label="a", state="in-use") for i in range(existing)]
    requests = [req(f"100-{i:010d}", [lbl] * n) for i, (lbl, n) in enumerate(reqs)]
    actions = planner.plan_requests(snap(requests, nodes, [v]))
    launched = sum(len(a.launch) for a in only(actions, Accept))
    assert existing + launched <= max(max_servers, existing)
    assert all(a.request_id != b.request_id for a in only(actions, Accept)
               for b in only(actions, Decline))


# -- min-ready -------------------------------------------------------------------------------------

def test_min_ready_counts_ready_and_outstanding_requests():
    labels = {"small": Label("small", min_ready=3), "big": Label("big", min_ready=1),
              "none": Label("none")}
    nodes = [node("1"), node("2", allocated_to="100-1")]
    reqs = [req("900-1", ["small"], requestor=planner.MIN_READY_REQUESTOR),
            req("900-2", ["big"], requestor=planner.MIN_READY_REQUESTOR, state="failed")]
    # a failed one counts while it is held (so a label nobody serves is not asked for in a
    # loop), and no longer after that
    reqs[1].state_time = 1000.0
    ready = minready.ready_counts(nodes)
    actions = minready.plan_min_ready(labels, ready, minready.pending_min_ready(reqs, 1010.0),
                                      {"small", "big"})
    assert actions == [SubmitMinReady("small", 1)]
    later = 1000.0 + minready.FAILED_HOLD + 1
    actions = minready.plan_min_ready(labels, ready, minready.pending_min_ready(reqs, later),
                                      {"small", "big"})
    assert actions == [SubmitMinReady("big", 1), SubmitMinReady("small", 1)]


def test_fulfilled_min_ready_request_still_counts_until_finished():
    labels = {"small": Label("small", min_ready=1)}
    reqs = [req("900-1", ["small"], requestor=planner.MIN_READY_REQUESTOR, state="fulfilled",
                nodes=["1"])]
    nodes = [node("1", allocated_to="900-1")]
    ready = minready.ready_counts(nodes)
    assert minready.plan_min_ready(labels, ready, minready.pending_min_ready(reqs, 0.0),
                                   {"small"}) == []


def test_min_ready_skips_labels_nobody_serves():
    labels = {"small": Label("small", min_ready=2)}
    assert minready.plan_min_ready(labels, minready.ready_counts([]), Counter(), set()) == []


# -- cleanup ---------------------------------------------------------------------------------------

def cleanup(nodes, requests=(), locked=(), locked_requests=(), labels=None, now=2000.0,
            max_hold_age=0, reusable=()):
    return cleanup_plan.plan_node_cleanup(list(nodes), list(requests), set(locked),
                                     set(locked_requests), labels or {}, {"sim"},
                                     max_hold_age, now, reusable)


def test_used_nodes_deleted_unless_locked():
    assert cleanup([node("1", state="used")]) == [DeleteNode("1", "used")]
    assert cleanup([node("1", state="used")], locked={"1"}) == []


def test_used_static_node_not_deleted():
    assert cleanup([node("1", state="used")], reusable={"sim"}) == []


def test_other_providers_nodes_untouched():
    assert cleanup([node("1", state="used", provider="other")]) == []


def test_max_ready_age():
    labels = {"small": Label("small", max_ready_age=600)}
    assert cleanup([node("1", state_time=1000.0)], labels=labels, now=1500.0) == []
    actions = cleanup([node("1", state_time=1000.0)], labels=labels, now=1700.0)
    assert len(actions) == 1 and isinstance(actions[0], DeleteNode)


def test_hold_expiration_and_max_hold_age():
    held = node("1", state="hold", state_time=1000.0, hold_expiration=100)
    assert cleanup([held], now=1050.0) == []
    assert isinstance(cleanup([held], now=1200.0)[0], DeleteNode)
    forever = node("2", state="hold", state_time=1000.0)
    assert cleanup([forever], now=99999.0) == []
    assert isinstance(cleanup([forever], now=99999.0, max_hold_age=3600)[0], DeleteNode)


def test_unlocked_building_node_is_abandoned():
    actions = cleanup([node("1", state="building")])
    assert actions == [DeleteNode("1", "building and not locked by anyone")]


def test_record_left_in_deleted_state_is_deleted_again_unless_locked():
    # a delete whose record removal failed after the instance was gone
    actions = cleanup([node("1", state="deleted")])
    assert actions == [DeleteNode("1", "deleted, but its record was left behind")]
    assert cleanup([node("1", state="deleted")], locked={"1"}) == []


def test_ready_node_of_vanished_request_is_deallocated():
    actions = cleanup([node("1", allocated_to="100-9")], requests=[req("100-1", ["small"])])
    assert actions == [Deallocate("1", "request 100-9 is gone")]
    assert cleanup([node("1", allocated_to="100-1")], requests=[req("100-1", ["small"])]) == []


def test_lost_pending_request_reset():
    reqs = [req("100-1", ["small"], state="pending"),
            req("100-2", ["small"], state="pending"),
            req("900-3", ["small"], state="fulfilled", requestor=planner.MIN_READY_REQUESTOR)]
    actions = cleanup([], requests=reqs, locked_requests={"100-2"})
    assert actions == [ResetLostRequest("100-1")]


def test_finished_min_ready_requests():
    reqs = [req("900-1", ["small"], state="fulfilled", requestor=planner.MIN_READY_REQUESTOR),
            req("900-2", ["small"], state="failed", requestor=planner.MIN_READY_REQUESTOR,
                state_time=1000.0),
            req("900-3", ["small"], state="fulfilled", requestor=planner.MIN_READY_REQUESTOR),
            req("100-4", ["small"], state="fulfilled")]
    assert minready.min_ready_to_finish(reqs, {"900-3"}, 1001.0) == ["900-1"]
    assert minready.min_ready_to_finish(reqs, {"900-3"}, 1000.0 + minready.FAILED_HOLD + 1) \
        == ["900-1", "900-2"]


# -- leaks -----------------------------------------------------------------------------------------

def inst(extid, node_id, provider="sim"):
    return Instance(external_id=extid, metadata={META_NODE_ID: node_id, META_PROVIDER: provider},
                    ready=True)


def test_leaked_instance_deleted_on_second_sighting_only():
    instances = [inst("i-1", "0001"), inst("i-2", "0002"), inst("i-3", "0003", provider="x"),
                 Instance(external_id="i-4")]
    nodes = [node("0002", external_id="i-2")]
    to_delete, suspects = cleanup_plan.leaked_instances("sim", instances, nodes, set())
    assert to_delete == [] and suspects == {"i-1"}
    to_delete, suspects = cleanup_plan.leaked_instances("sim", instances, nodes, suspects)
    assert [i.external_id for i in to_delete] == ["i-1"]


def test_instance_of_a_retried_launch_is_a_leak_once_node_is_ready():
    instances = [inst("old", "0001"), inst("new", "0001")]
    building = [node("0001", state="building", external_id="new")]
    assert cleanup_plan.leaked_instances("sim", instances, building, {"old"})[0] == []
    ready = [node("0001", state="ready", external_id="new")]
    assert [i.external_id for i in
            cleanup_plan.leaked_instances("sim", instances, ready, {"old"})[0]] == ["old"]


def test_unmanaged_usage_counts_foreign_instances():
    instances = [Instance(external_id="a", resources=Resources.of(cores=2)),
                 Instance(external_id="b"), inst("c", "0001")]
    index = NodeIndex().refresh(_ListStore([node("0001", external_id="c"),
                                            node("0002", external_id="d", provider="other")]))
    used = cleanup_plan.unmanaged_usage(instances, index.external_ids("sim"))
    assert used["instances"] == 2 and used["cores"] == 2
    # the instance of another provider's record is not ours either
    used = cleanup_plan.unmanaged_usage([inst("d", "0002")], index.external_ids("sim"))
    assert used["instances"] == 1


class _ListStore:
    """Just enough store for a NodeIndex: no change feed, a listing."""

    def __init__(self, nodes):
        self.nodes = nodes

    def node_changes(self, since):
        return None, None

    def list_nodes(self, shared=False):
        return list(self.nodes)


def test_request_declined_by_every_remaining_pool_fails():
    """A pool that had not declined went away: nobody is left to serve the request."""
    from nodepool.launcher.planner import FailRequest
    v = view(pool(labels=("other",)))
    r = req("100-1", ["small"], declined_by=[v.pool_id, "gone-pool"])
    assert planner.plan_requests(snap([r], [], [v])) == [FailRequest("100-1")]
    other = Component(kind="pool", pool_id="alive", provider_name="x",
                      supported_labels=["small"], priority=100)
    assert planner.plan_requests(snap([r], [], [v], [other])) == []


def test_min_ready_asks_only_for_labels_a_pool_can_launch_now():
    labels = ("drained", "broken", "huge", "noimage", "ok")
    views = [view(pool(name="off", labels=("drained",), max_servers=0)),
             view(pool(name="on", labels=("broken", "huge", "noimage", "ok"), max_servers=5),
                  broken_labels={"broken": "flavor m1.nope not found"},
                  unavailable_labels={"noimage": "no ready upload"},
                  label_costs={"huge": Resources.of(instances=1, cores=64)},
                  cloud_limits=Limits.of(cores=8))]
    down = view(pool(name="down", provider="other", labels=labels), down="other: no creds")
    mine = [v.pool_id for v in views + [down]]
    assert minready.servable_labels(views + [down], [], mine) == {"ok"}
    # a label only another launcher's pool serves is asked for: that launcher judges it
    other = comp(view(pool(name="x", provider="elsewhere", labels=("drained",))))
    assert minready.servable_labels(views, [other], mine) == {"ok", "drained"}


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 7), st.sampled_from(
    ["ready", "building", "in-use", "deleted"]), st.booleans(), st.sampled_from(["a", "b"]),
    st.integers(0, 3)), max_size=8), min_size=1, max_size=6))
def test_fleet_carried_between_passes_equals_a_fresh_count(passes):
    """Records are replaced when they change: the carried tallies must match a recount."""
    v = view(pool(labels=("a", "b")))
    views = {v.key: v}
    fleet = planner.Fleet()
    current = {}
    for changes in passes:
        for nid, state, allocated, label, t in changes:
            if state == "deleted" and allocated:
                current.pop(str(nid), None)          # the record went
                continue
            current[str(nid)] = node(str(nid), label=label, state=state, state_time=float(t),
                                     allocated_to="100-1" if allocated else None,
                                     tenant_name="t" if t % 2 else None,
                                     resources={"instances": 1, "cores": t})
        nodes = sorted(current.values(), key=lambda n: n.id)
        fleet.update(nodes, views)
        fresh = planner.Fleet().update(nodes, views)
        clean = lambda d: {k: {r: x for r, x in res.items() if x} for k, res in d.items()
                           if any(res.values())}
        assert clean(fleet.pool_usage) == clean(fresh.pool_usage)
        assert clean(fleet.provider_usage) == clean(fresh.provider_usage)
        assert clean(fleet.tenant_usage) == clean(fresh.tenant_usage)
        assert {k: [n.id for n in ns] for k, ns in fleet.free.items() if ns} == \
            {k: [n.id for n in ns] for k, ns in fresh.free.items() if ns}
        assert +fleet.ready == minready.ready_counts(nodes)


_STATES = ["ready", "in-use", "used", "hold", "init", "building", "deleting", "failed"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_STATES), st.sampled_from(["small", "aged"]),
                          st.sampled_from([None, "100-1", "100-gone"]),
                          st.floats(min_value=0, max_value=2000)),
                max_size=25),
       st.booleans())
def test_cleanup_candidates_give_the_plan_of_the_whole_fleet(specs, aged_label):
    """A cleanup pass over the index's candidates decides exactly what one over every node
    would, whatever the states, allocations and max-ready-ages."""
    nodes = [node(f"{i:04d}", label=label, state=state, allocated_to=alloc, state_time=t)
             for i, (state, label, alloc, t) in enumerate(specs)]
    labels = {"small": Label("small"),
              "aged": Label("aged", max_ready_age=500 if aged_label else 0)}
    index = NodeIndex().refresh(_ListStore(nodes))
    aged = {name for name, lbl in labels.items() if lbl.max_ready_age}
    candidates = index.cleanup_candidates(aged)
    assert [n.id for n in candidates] == sorted(n.id for n in candidates)
    requests = [req("100-1", ["small"])]
    assert cleanup(candidates, requests, labels=labels) == cleanup(nodes, requests, labels=labels)
    if not aged:
        assert all(n.state != "ready" or n.allocated_to for n in candidates)
