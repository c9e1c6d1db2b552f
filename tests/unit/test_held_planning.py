"""Which held requests a pass plans: those with news, not every one every pass.

A launcher filling a large fleet holds thousands of min-ready requests that only wait for their
launches; planning each of them every pass made a pass cost the whole fleet.  These tests pin
the rule (``RequestHandler._due``): a held request is planned when it is new, its last plan did
more than wait, a node of its changed, a launch of its ended, its record changed, it has open
slots or a backoff entry, the configuration changed, the session was lost, or
``FULL_PASS_INTERVAL`` passed.
"""
import pytest

from nodepool.launcher import lifecycle as lc
from nodepool.launcher import requests as rq
from nodepool.launcher.nodeindex import NodeIndex
from nodepool.launcher.reasons import Reason, Why
from nodepool.launcher.requestindex import RequestIndex
from nodepool.model import Node, NodeRequest
from nodepool.model.states import NodeState


class Worker:
    def __init__(self):
        self.launching = set()

    def launching_ids(self):
        return frozenset(self.launching)


class Providers:
    def __init__(self):
        self.workers = {"sim": Worker()}


class ChangeFeed:
    """A store's change feeds, reduced to what the indexes' ``refresh`` reads."""

    def __init__(self):
        self.position = 0
        self.pending = {"node": {}, "request": {}}

    def _changes(self, kind):
        changes, self.pending[kind] = self.pending[kind], {}
        self.position += 1
        return self.position, changes

    def node_changes(self, position):
        return self._changes("node")

    def request_changes(self, position):
        return self._changes("request")

    def holds(self, lock):
        return True


def waiting(request_id):
    return [lc.Wait(request_id, Reason(Why.LAUNCHING))]


class Pass:
    """One handler, its indexes and its clock, passes run by hand."""

    def __init__(self):
        self.config = object()
        self.feed = ChangeFeed()
        self.handler = rq.RequestHandler(self.feed, Providers(), lambda: self.config, "test")
        self.index = NodeIndex()
        self.requests = RequestIndex()
        self.now = 1000.0
        # every plan only waits for launches, unless a test says otherwise
        self.handler._advance = lambda h, c, b: waiting(h.request_id)

    def hold(self, rid, node_ids=()):
        req = NodeRequest(id=rid, node_types=["small"] * len(node_ids), state="pending")
        req.version = 1
        self.change_request(req)
        held = lc.Held(rid, "sim/main", "pool-id", lock=None, request=req,
                       node_locks={nid: object() for nid in node_ids})
        self.handler.held[rid] = held
        self.handler._replan.add(rid)
        for nid in node_ids:
            self.handler._owner[nid] = rid
            self.change(Node(id=nid, state=NodeState.BUILDING, type=["small"], allocated_to=rid))
        return held

    def change(self, node):
        self.feed.pending["node"][node.id] = node

    def change_request(self, req):
        self.feed.pending["request"][req.id] = req

    def due(self):
        self.handler.note_launches()
        self.index.refresh(self.feed)
        self.requests.refresh(self.feed)
        return self.handler._due(self.index, self.requests, self.now)

    def run(self, advance=0.0):
        """One pass: which held requests are due; each is planned (by the test's plan)."""
        self.now += advance
        due = self.due()
        for rid, held in due:
            self.handler._plan(held, self.requests.by_id.get(rid), self.index.by_id)
        return sorted(rid for rid, _ in due)


@pytest.fixture
def p():
    p = Pass()
    p.hold("100-1", ["1"])
    p.hold("100-2", ["2"])
    assert p.run() == ["100-1", "100-2"]       # first pass: everything is new
    assert p.run(1) == []                      # only waiting: nothing to plan
    return p


def test_a_changed_node_plans_its_request_only(p):
    p.change(Node(id="2", state=NodeState.READY, type=["small"], allocated_to="100-2"))
    assert p.run(1) == ["100-2"]
    assert p.run(1) == []


def test_an_ended_launch_plans_its_request(p):
    p.handler.providers.workers["sim"].launching.add("1")
    assert p.run(1) == []
    p.handler.providers.workers["sim"].launching.clear()    # ended without writing its node
    assert p.run(1) == ["100-1"]


def test_a_changed_or_deleted_request_is_planned(p):
    changed = p.requests.by_id["100-1"].copy()
    changed.version = 2
    p.change_request(changed)
    p.feed.pending["request"]["100-2"] = None
    assert p.run(1) == ["100-1", "100-2"]


def test_a_plan_that_acted_is_planned_again(p):
    p.change(Node(id="1", state=NodeState.FAILED, type=["small"], allocated_to="100-1"))
    [(rid, held)] = p.due()
    p.handler._advance = lambda h, c, b: [lc.GiveBack(h.request_id, Reason(Why.LAUNCH_FAILED))]
    p.handler._plan(held, p.requests.by_id[rid], p.index.by_id)
    p.handler._advance = lambda h, c, b: waiting(h.request_id)
    assert p.run(1) == ["100-1"]
    assert p.run(1) == []


def test_open_slots_and_request_errors_are_planned_every_pass(p):
    def opens(h, c, b):
        h.open_slots = True
        return [lc.Wait(h.request_id, Reason(Why.BACKOFF, "small"))]
    p.change(Node(id="1", state=NodeState.ABORTED, type=["small"], allocated_to="100-1"))
    p.handler._advance = lambda h, c, b: opens(h, c, b) if h.request_id == "100-1" \
        else waiting(h.request_id)
    assert p.run(1) == ["100-1"]
    assert "100-1" in p.handler._open and p.handler.waiting_on_time()
    p.handler.request_backoff.failed("100-2", p.now)
    assert p.run(0.5) == ["100-1"]                  # 100-2 is backing off
    assert p.run(5) == ["100-1", "100-2"]           # its backoff is over: planned again


def test_a_new_configuration_a_lost_session_or_the_interval_plans_everything(p):
    p.config = object()
    assert p.run(1) == ["100-1", "100-2"]
    assert p.run(1) == []
    p.handler.session_lost()
    assert p.run(1) == ["100-1", "100-2"]
    assert p.run(1) == []
    assert p.run(rq.FULL_PASS_INTERVAL) == ["100-1", "100-2"]


def test_a_node_that_left_its_request_no_longer_plans_it(p):
    del p.handler.held["100-1"].node_locks["1"]
    p.change(Node(id="1", state=NodeState.DELETING, type=["small"]))
    assert p.run(1) == []
    assert "1" not in p.handler._owner
    p.hold("100-3", ["3"])
    assert p.run(1) == ["100-3"]


def test_a_forgotten_request_drops_its_nodes_and_marks(p):
    class Lock:
        released = False

        def release(self):
            pass
    held = p.handler.held["100-1"]
    held.node_locks = {"1": Lock()}
    held.lock = Lock()
    p.handler._replan.add("100-1")
    p.handler._forget(held)
    assert "1" not in p.handler._owner and "100-1" not in p.handler.held
    assert "100-1" not in p.handler._replan
    p.handler._replan.add("gone")                   # e.g. an accept that did not go through
    assert p.run(1) == []
    assert "gone" not in p.handler._replan
