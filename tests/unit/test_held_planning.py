"""Which held requests a pass plans: those with news, not every one every pass.

A launcher filling a large fleet holds thousands of min-ready requests that only wait for their
launches; planning each of them every pass made a pass cost the whole fleet.  These tests pin
the rule (``RequestHandler._due``): a held request is planned when it is new, its last plan did
more than wait, a node of its changed, a launch of its ended, its record changed, it has open
slots or a backoff entry, the configuration changed, or ``FULL_PASS_INTERVAL`` passed.
"""
import pytest

from nodepool.launcher import lifecycle as lc
from nodepool.launcher import requests as rq
from nodepool.launcher.nodeindex import NodeIndex
from nodepool.launcher.reasons import Reason, Why
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
    """A store's change feed, reduced to what ``NodeIndex.refresh`` reads."""

    def __init__(self):
        self.position = 0
        self.pending = {}

    def node_changes(self, position):
        changes, self.pending = self.pending, {}
        self.position += 1
        return self.position, changes


class Pass:
    """One handler, its index and its clock, passes run by hand."""

    def __init__(self):
        self.config = object()
        self.handler = rq.RequestHandler(None, Providers(), lambda: self.config, "test")
        self.feed = ChangeFeed()
        self.index = NodeIndex()
        self.now = 1000.0
        self.requests = {}
        # every plan only waits for launches, unless a test says otherwise
        self.handler._advance = lambda h, c, b: [lc.Wait(h.request_id, Reason(Why.LAUNCHING))]

    def hold(self, rid, node_ids=()):
        req = NodeRequest(id=rid, node_types=["small"] * len(node_ids), state="pending")
        req.version = 1
        self.requests[rid] = req
        held = lc.Held(rid, "sim/main", "pool-id", lock=None, request=req,
                       node_locks={nid: object() for nid in node_ids})
        self.handler.held[rid] = held
        for nid in node_ids:
            self.handler._owner[nid] = rid
            self.change(Node(id=nid, state=NodeState.BUILDING, type=["small"], allocated_to=rid))
        return held

    def change(self, node):
        self.feed.pending[node.id] = node

    def run(self, advance=0.0):
        """One pass: which held requests are due; each is 'planned' as waiting for launches."""
        self.now += advance
        self.handler.note_launches()
        self.index.refresh(self.feed)
        due = self.handler._due(self.index, self.requests, self.now)
        for rid, held in due:
            self.handler._plan(held, self.requests.get(rid), self.index.by_id)
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
    changed = p.requests["100-1"].copy()
    changed.version = 2
    p.requests["100-1"] = changed
    del p.requests["100-2"]
    assert p.run(1) == ["100-1", "100-2"]


def test_a_plan_that_acted_is_planned_again(p):
    p.change(Node(id="1", state=NodeState.FAILED, type=["small"], allocated_to="100-1"))
    p.handler.note_launches()
    p.index.refresh(p.feed)
    [(rid, held)] = p.handler._due(p.index, p.requests, p.now)
    p.handler._advance = lambda h, c, b: [lc.GiveBack(h.request_id, Reason(Why.LAUNCH_FAILED))]
    p.handler._plan(held, p.requests[rid], p.index.by_id)
    assert held.replan
    p.handler._advance = lambda h, c, b: [lc.Wait(h.request_id, Reason(Why.LAUNCHING))]
    assert p.run(1) == ["100-1"]
    assert p.run(1) == []


def test_open_slots_and_request_errors_are_planned_every_pass(p):
    p.handler.held["100-1"].open_slots = True
    p.handler.request_backoff.failed("100-2", p.now)
    assert p.run(0.5) == ["100-1"]                  # 100-2 is backing off
    assert "100-2" in p.run(5)                      # its backoff is over: planned again


def test_a_new_configuration_or_the_interval_plans_everything(p):
    p.config = object()
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


def test_a_forgotten_request_drops_its_nodes(p):
    class Lock:
        def release(self):
            pass
    held = p.handler.held["100-1"]
    held.node_locks = {"1": Lock()}
    held.lock = Lock()
    p.handler._forget(held)
    assert "1" not in p.handler._owner and "100-1" not in p.handler.held
