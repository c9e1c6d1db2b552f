"""The planner with a pool that never launches (static hosts): assign ready nodes or wait."""
import itertools
import math

from hypothesis import given, strategies as st

from nodepool.config.model import Pool, PoolLabel
from nodepool.launcher import planner
from nodepool.launcher.matching import can_match_all
from nodepool.launcher.planner import Accept, Decline, Defer, PoolView, Snapshot
from nodepool.model import Component, Node, NodeRequest


def static_pool(labels=("linux",), name="hosts", provider="static"):
    p = Pool(name=name, provider=provider, max_servers=math.inf)
    p.labels = {lbl: PoolLabel(name=lbl, pool=name, provider=provider) for lbl in labels}
    return p


def static_view(labels=("linux",), **kw):
    p = static_pool(labels, **kw)
    return PoolView(pool=p, pool_id=f"id-{p.key}", launches=False)


def ready(nid, label="linux", **kw):
    return Node(id=nid, type=[label], state="ready", provider="static", pool="hosts",
                state_time=1000.0, **kw)


def plan(requests, nodes, views, locked=()):
    comps = [Component(kind="pool", pool_id=v.pool_id, provider_name=v.provider,
                       supported_labels=sorted(v.pool.labels), priority=v.priority)
             for v in views]
    return planner.plan_requests(Snapshot(requests=list(requests), nodes=list(nodes),
                                          pools=list(views), registered_pools=comps,
                                          locked_nodes=set(locked)))


def test_free_registered_node_is_assigned():
    actions = plan([NodeRequest(id="100-1", node_types=["linux"])], [ready("1")],
                   [static_view()])
    assert actions == [Accept("100-1", "static/hosts", (("linux", "1"),), ())]


def test_no_free_node_defers_without_pausing_and_never_launches():
    v = static_view()
    actions = plan([NodeRequest(id="100-1", node_types=["linux"])],
                   [ready("1", allocated_to="100-0")], [v])
    assert len(actions) == 1
    assert isinstance(actions[0], Defer) and not actions[0].pauses
    assert "no free registered node" in str(actions[0].reason)


def test_locked_node_is_not_free():
    actions = plan([NodeRequest(id="100-1", node_types=["linux"])], [ready("1")],
                   [static_view()], locked={"1"})
    assert isinstance(actions[0], Defer)


def test_waiting_request_does_not_block_a_later_request_for_another_label():
    v = static_view(("linux", "windows"))
    actions = plan([NodeRequest(id="100-1", node_types=["linux"]),
                    NodeRequest(id="100-2", node_types=["windows"])],
                   [ready("2", label="windows")], [v])
    assert isinstance(actions[0], Defer)
    assert actions[1] == Accept("100-2", "static/hosts", (("windows", "2"),), ())


def test_partly_free_multi_node_request_takes_nothing_and_waits():
    v = static_view()
    actions = plan([NodeRequest(id="100-1", node_types=["linux", "linux"]),
                    NodeRequest(id="100-2", node_types=["linux"])], [ready("1")], [v])
    assert isinstance(actions[0], Defer)
    # the free node was not reserved by the waiting request
    assert actions[1] == Accept("100-2", "static/hosts", (("linux", "1"),), ())


def test_label_no_host_has_is_declined():
    actions = plan([NodeRequest(id="100-1", node_types=["gpu"])], [ready("1")],
                   [static_view()])
    assert len(actions) == 1 and isinstance(actions[0], Decline)
    assert "gpu" in str(actions[0].reason)


def test_request_without_reuse_waits():
    actions = plan([NodeRequest(id="900-1", node_types=["linux"], reuse=False,
                                requestor=planner.MIN_READY_REQUESTOR)],
                   [ready("1")], [static_view()])
    assert isinstance(actions[0], Defer) and not actions[0].pauses


def test_launching_pool_still_launches():
    p = static_pool(provider="sim")
    actions = plan([NodeRequest(id="100-1", node_types=["linux"])], [],
                   [PoolView(pool=p, pool_id="id")])
    assert actions == [Accept("100-1", "sim/hosts", (), ("linux",))]


def test_request_more_than_the_hosts_can_ever_hold_is_declined():
    # two slots: one host (linux), one (linux or windows)
    v = static_view(("linux", "windows"))
    v.slot_labels = [frozenset({"linux"}), frozenset({"linux", "windows"})]
    actions = plan([NodeRequest(id="100-1", node_types=["linux", "linux", "linux"]),
                    NodeRequest(id="100-2", node_types=["windows", "windows"]),
                    NodeRequest(id="100-3", node_types=["linux", "windows"])],
                   [ready("1", allocated_to="100-0")], [v])
    declined = {a.request_id for a in actions if isinstance(a, Decline)}
    assert declined == {"100-1", "100-2"}
    assert all("can never serve" in str(a.reason) for a in actions if isinstance(a, Decline))
    # linux + windows fits (windows on the second host): it waits for the busy host
    assert any(isinstance(a, Defer) and a.request_id == "100-3" for a in actions)


@given(st.lists(st.frozensets(st.sampled_from("abc"), min_size=1), max_size=5),
       st.lists(st.sampled_from("abc"), min_size=1, max_size=5))
def test_slot_matching_agrees_with_brute_force(slots, wanted):
    brute = any(all(wanted[i] in slots[perm[i]] for i in range(len(wanted)))
                for perm in itertools.permutations(range(len(slots)), len(wanted)))
    assert can_match_all(wanted, slots) == brute
