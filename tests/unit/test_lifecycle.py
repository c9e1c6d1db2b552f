"""The accepted-request lifecycle: plain data in, actions out (no store, no threads, no clock)."""
import itertools

from hypothesis import given, settings, strategies as st

from nodepool.launcher import lifecycle as lc
from nodepool.launcher.backoff import Backoff
from nodepool.launcher.matching import can_match_all, match_labels
from nodepool.launcher.reasons import Reason, Why
from nodepool.model import Node, NodeRequest
from nodepool.model.states import NodeState


def req(labels=("small",), state="pending", nodes=()):
    return NodeRequest(id="100-1", node_types=list(labels), state=state, nodes=list(nodes))


def node(nid, label="small", state="ready", **kw):
    return Node(id=nid, type=[label] if isinstance(label, str) else list(label), state=state,
                allocated_to="100-1", **kw)


def held(request, nodes=(), ours=None, in_flight=(), blocked=(), holds=True, pool=True):
    ours = ours if ours is not None else {n.id for n in nodes}
    return lc.HeldView(request_id="100-1", request=request, holds_request=holds,
                       nodes=tuple((n.id, n.id in ours) for n in nodes),
                       in_flight=frozenset(in_flight), blocked_labels=frozenset(blocked),
                       pool_present=pool)


def plan(h, current, nodes):
    return lc.plan_held(h, current, {n.id: n for n in nodes})


def kinds(actions):
    return [type(a).__name__ for a in actions]


def test_all_ready_is_fulfilled_in_request_order():
    r = req(["big", "small"])
    nodes = [node("1", "small"), node("2", "big")]
    assert plan(held(r, nodes), r, nodes) == [lc.Fulfil("100-1", ("2", "1"))]


def test_open_slot_is_launched_unless_its_label_backs_off():
    r = req(["small", "big"])
    nodes = [node("1", "small", state="building")]
    assert plan(held(r, nodes, in_flight={"1"}), r, nodes) == [lc.Launch("100-1", ("big",))]
    actions = plan(held(r, nodes, in_flight={"1"}, blocked={"big"}), r, nodes)
    assert actions == [lc.Wait("100-1", Reason(Why.BACKOFF, "big"))]


def test_quota_aborted_node_is_discarded_and_its_slot_waits_for_the_backoff():
    r = req(["small"])
    nodes = [node("1", state="aborted")]
    actions = plan(held(r, nodes), r, nodes)
    assert kinds(actions) == ["Discard", "Wait"] and actions[1].reason.kind is Why.BACKOFF
    # once the aborted node is gone and the backoff ran out, the slot is launched again
    assert kinds(plan(held(r, []), r, [])) == ["Launch"]


def test_launch_that_is_no_longer_running_is_discarded_and_relaunched():
    r = req(["small"])
    nodes = [node("1", state="building")]
    assert kinds(plan(held(r, nodes, in_flight=()), r, nodes)) == ["Discard", "Launch"]
    assert kinds(plan(held(r, nodes, in_flight={"1"}), r, nodes)) == ["Wait"]


def test_failed_node_gives_the_request_back_and_leaves_running_siblings_alone():
    r = req(["small", "big", "small"])
    failed = node("1", "big", state="failed", extra={"failure_reason": "boom"})
    building = node("2", "small", state="building")
    ready = node("3", "small")
    nodes = [failed, building, ready]
    actions = plan(held(r, nodes, in_flight={"2"}), r, nodes)
    assert actions[0] == lc.GiveBack("100-1", Reason(Why.LAUNCH_FAILED, "boom"))
    assert lc.Discard("1", "failed, request 100-1 let go") in actions
    assert lc.ReturnNode("3") in actions
    # the sibling still launching keeps its lock (no action) and the request is not dropped
    assert not [a for a in actions if getattr(a, "node_id", None) == "2"]
    assert not any(isinstance(a, lc.Drop) for a in actions)


def test_removed_provider_gives_the_request_back():
    r = req(["small"])
    nodes = [node("1", state="building")]
    actions = plan(held(r, nodes, in_flight={"1"}, pool=False), r, nodes)
    assert actions == [lc.GiveBack("100-1", Reason(Why.PROVIDER_REMOVED))]


def test_missing_node_is_verified_not_taken_for_gone():
    r = req(["small"])
    nodes = [node("1", state="building")]
    assert plan(held(r, nodes, in_flight={"1"}), r, []) == [lc.Verify("1")]


def test_locks_lost_with_the_session_are_forgotten_without_writing():
    r = req(["small"])
    nodes = [node("1")]
    actions = plan(held(r, nodes, ours=set(), holds=False), r, nodes)
    assert actions == [lc.Forget("1"), lc.Drop("100-1")]


def test_request_gone_returns_ready_nodes_and_waits_for_launches():
    r = req(["small", "small"])
    nodes = [node("1"), node("2", state="building")]
    actions = plan(held(r, nodes, in_flight={"2"}), None, nodes)
    assert actions == [lc.LetGo("100-1", "the request is gone"), lc.ReturnNode("1")]
    # once the launch ended, the ready node goes back too and the request is forgotten
    nodes[1] = node("2")
    h = held(r, nodes, holds=False)
    assert plan(h, None, nodes) == [lc.ReturnNode("1"), lc.ReturnNode("2"), lc.Drop("100-1")]


def test_fulfilled_request_is_done_without_returning_nodes():
    r = req(["small"])
    nodes = [node("1")]
    current = req(["small"], state="fulfilled", nodes=["1"])
    assert plan(held(r, nodes), current, nodes) == [lc.Done("100-1")]


# -- the invariant ----------------------------------------------------------------------------

STATES = ["init", "building", "ready", "failed", "aborted", "deleting", "in-use"]

node_specs = st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(STATES),
                                st.booleans(), st.booleans()), max_size=4)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(["a", "b"]), min_size=1, max_size=3), node_specs,
       st.sampled_from(["requested", "pending", "fulfilled", "failed", None]),
       st.booleans(), st.booleans(), st.sets(st.sampled_from(["a", "b"])))
def test_a_held_request_is_never_left_without_an_end_or_progress(
        labels, specs, current_state, holds, pool, blocked):
    r = req(labels)
    nodes, ours, flying = [], set(), set()
    for i, (label, state, mine, running) in enumerate(specs):
        n = node(str(i), label, state=state)
        nodes.append(n)
        if mine:
            ours.add(n.id)
        if running and state in ("init", "building"):
            flying.add(n.id)
    current = None if current_state is None else req(labels, state=current_state,
                                                     nodes=[n.id for n in nodes])
    h = held(r, nodes, ours=ours, in_flight=flying, blocked=blocked, holds=holds, pool=pool)
    actions = plan(h, current, nodes)
    ends = (lc.Fulfil, lc.GiveBack, lc.LetGo, lc.Done, lc.Drop)
    progress = (lc.Launch, lc.Verify, lc.Discard, lc.ReturnNode)
    waits_on_something = any(isinstance(a, lc.Wait) and (
        a.reason.kind is Why.BACKOFF or (a.reason.kind is Why.LAUNCHING and flying & ours))
        for a in actions)
    running_mine = bool(flying & ours)
    assert any(isinstance(a, ends + progress) for a in actions) or waits_on_something \
        or running_mine, actions
    # a node whose lock is not ours is never written: only forgotten
    for a in actions:
        nid = getattr(a, "node_id", None)
        if nid is not None and not isinstance(a, (lc.Forget, lc.Verify)):
            assert nid in ours, a
    # every node of ours that is not launching ends up somewhere once the request is let go
    if any(isinstance(a, (lc.GiveBack, lc.LetGo, lc.Drop)) for a in actions):
        handled = {getattr(a, "node_id", None) for a in actions}
        for n in nodes:
            if n.id in ours and n.id not in flying:
                assert n.id in handled, (n, actions)
    # a fulfilment names one node per requested label, all ready and ours
    for a in actions:
        if isinstance(a, lc.Fulfil):
            chosen = [next(n for n in nodes if n.id == nid) for nid in a.node_ids]
            assert [lbl in n.type for lbl, n in zip(labels, chosen)] == [True] * len(labels)
            assert all(n.state == NodeState.READY and n.id in ours for n in chosen)
            assert len(set(a.node_ids)) == len(labels)


# -- matching, reasons, backoff ---------------------------------------------------------------

@given(st.lists(st.frozensets(st.sampled_from("abc"), min_size=1), max_size=5),
       st.lists(st.sampled_from("abc"), min_size=1, max_size=4))
def test_label_matching_is_maximal(sets, wanted):
    best = 0
    for k in range(len(wanted), 0, -1):
        for positions in itertools.combinations(range(len(wanted)), k):
            if any(all(wanted[p] in sets[c] for p, c in zip(positions, perm))
                   for perm in itertools.permutations(range(len(sets)), k)):
                best = k
                break
        if best:
            break
    match = match_labels(wanted, sets)
    assert len(match) == best
    assert len(set(match.values())) == len(match)
    assert all(wanted[p] in sets[c] for p, c in match.items())
    assert can_match_all(wanted, sets) == (best == len(wanted))


def test_decisions_do_not_depend_on_the_wording_of_reasons(monkeypatch):
    monkeypatch.setattr(Reason, "__str__", lambda self: "reworded")
    assert Why.TENANT_LIMIT.global_limit and not Why.POOL_FULL.global_limit
    r = req(["small"])
    nodes = [node("1", state="failed", extra={"failure_reason": "x"})]
    assert kinds(plan(held(r, nodes), r, nodes))[0] == "GiveBack"


def test_backoff_doubles_to_its_cap_and_resets():
    b = Backoff(base=1.0, cap=5.0)
    assert [b.failed("k", 0.0) for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert b.waiting("k", 4.9) and not b.waiting("k", 5.1)
    assert b.blocked(1.0) == {"k"}
    b.succeeded("k")
    assert not b.waiting("k", 0.0) and b.failures("k") == 0
    b.failed("x", 0.0)
    b.forget(lambda key: key != "x")
    assert len(b) == 0


def test_backoff_lifted_ends_the_wait_but_keeps_the_count():
    b = Backoff(base=2.0, cap=120.0)
    b.failed("k", 10.0)
    b.failed("k", 13.0)
    assert b.since("k") == 13.0 and b.until("k") == 17.0 and b.waiting("k", 14.0)
    b.lift("k")
    assert not b.waiting("k", 14.0) and b.blocked(14.0) == set() and "k" in b.keys()
    assert b.failed("k", 14.0) == 8.0           # one more refusal waits longer still
    b.lift("gone")                              # no entry: nothing happens
    assert b.since("gone") is None and b.until("gone") is None
