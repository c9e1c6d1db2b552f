"""Behaviour every state store must have (``nodepool/store/base.py``), run against each one.

A test module subclasses ``StoreContract`` and provides a fixture ``store_factory``: a callable
that returns a new *started* store object (its own session) on the same shared backing data, and
stops every store it made at teardown.  The tests only use the public interface, so what passes
here behaves the same for the launcher, builder, CLI and clients whatever the store.

Changes made through one store object may reach another object's listings a little later (the
ZooKeeper store lists from a watch-fed cache), so cross-object listings are waited for; ``get_*``
reads are direct and checked at once.  Versions are compared, never given absolute values
(ZooKeeper counts from 0), and so are sequence numbers.
"""
import re
import threading
import time

import pytest

from nodepool.errors import ConflictError, LockError, NotFoundError
from nodepool.model.records import Component, ImageBuild, ImageUpload, Node, NodeRequest
from nodepool.model.states import BuildState, NodeState, RequestState, UploadState
from nodepool.store.base import (ChangeWatcher, Lock, image_build_lock_path, node_lock_path,
                                 request_lock_path, upload_lock_path)

WAIT = 15.0
TEN_DIGITS = re.compile(r"^\d{10}$")
REQUEST_ID = re.compile(r"^(\d{3})-(\d{10})$")


def eventually(predicate, timeout=WAIT, what="condition"):
    """Poll ``predicate`` until it is truthy and return its value; generous timeout, and never
    an assertion on how long it took."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def drain(watcher):
    """Consume notifications already queued so the next ``wait`` reflects a new change."""
    for _ in range(50):
        if not watcher.wait(0.05):
            return


def new_node(label="small", state=NodeState.READY, **kw):
    return Node(state=state, type=[label], provider="p1", pool="main", **kw)


class StoreContract:
    """Subclass and provide a ``store_factory`` fixture (see the module docstring)."""

    @pytest.fixture
    def store(self, store_factory):
        return store_factory()

    # -- nodes -------------------------------------------------------------------------------------

    def test_create_node_assigns_id_times_and_version(self, store):
        node = new_node()
        assert store.create_node(node) is node
        assert TEN_DIGITS.match(node.id)
        assert node.created_time is not None and node.state_time is not None
        assert node.version is not None
        got = store.get_node(node.id)
        assert got is not node
        assert got.id == node.id
        assert got.version == node.version
        assert got.state == NodeState.READY
        assert got.type == ["small"]
        assert got.to_dict() == node.to_dict()

    def test_get_missing_node_is_none(self, store):
        assert store.get_node("9999999999") is None

    def test_node_ids_increase_and_are_never_reused(self, store):
        ids = [store.create_node(new_node()).id for _ in range(3)]
        assert ids == sorted(ids) and len(set(ids)) == 3
        store.delete_node(ids[-1])
        again = store.create_node(new_node()).id
        assert again not in ids
        assert int(again) > int(ids[-1])

    def test_update_node_bumps_version_and_persists(self, store_factory):
        a, b = store_factory(), store_factory()
        node = a.create_node(new_node(state=NodeState.BUILDING))
        first = node.version
        node.set_state(NodeState.READY)
        node.external_id = "i-1"
        a.update_node(node)
        assert node.version > first
        got = b.get_node(node.id)
        assert got.state == NodeState.READY
        assert got.external_id == "i-1"
        assert got.version == node.version

    def test_update_node_compare_and_set(self, store_factory):
        a, b = store_factory(), store_factory()
        node = a.create_node(new_node())
        mine, theirs = a.get_node(node.id), b.get_node(node.id)
        theirs.comment = "theirs"
        b.update_node(theirs, check_version=True)
        mine.comment = "mine"
        with pytest.raises(ConflictError):
            a.update_node(mine, check_version=True)
        assert a.get_node(node.id).comment == "theirs"
        fresh = a.get_node(node.id)
        fresh.comment = "fresh"
        a.update_node(fresh, check_version=True)
        a.update_node(mine)       # without the check the last writer wins
        assert b.get_node(node.id).comment == "mine"

    def test_update_deleted_node_is_not_found(self, store):
        node = store.create_node(new_node())
        store.delete_node(node.id)
        node.comment = "late"
        with pytest.raises(NotFoundError):
            store.update_node(node)
        assert store.get_node(node.id) is None

    def test_delete_missing_node_is_not_an_error(self, store):
        store.delete_node("9999999999")

    def test_list_nodes_is_ordered_by_id(self, store):
        ids = [store.create_node(new_node(label=f"l{i}")).id for i in range(5)]
        assert [n.id for n in store.list_nodes()] == ids

    def test_list_nodes_returns_fresh_objects(self, store):
        node = store.create_node(new_node(host_keys=["ssh-rsa AAA"]))
        listed = store.list_nodes()[0]
        listed.comment = "scribble"
        listed.type.append("extra-label")
        listed.host_keys.append("ssh-ed25519 BBB")
        again = store.list_nodes()[0]
        assert again.id == node.id
        assert again.comment is None
        assert again.type == ["small"]
        assert again.host_keys == ["ssh-rsa AAA"]

    def test_list_nodes_follows_other_store_changes(self, store_factory):
        a, b = store_factory(), store_factory()
        n1 = a.create_node(new_node())
        n2 = a.create_node(new_node())
        eventually(lambda: [n.id for n in b.list_nodes()] == [n1.id, n2.id], what="b sees nodes")
        assert [n.id for n in a.list_nodes()] == [n1.id, n2.id]
        n1.state = NodeState.USED
        a.update_node(n1)
        a.delete_node(n2.id)
        eventually(lambda: [(n.id, n.state) for n in b.list_nodes()] == [(n1.id, NodeState.USED)],
                   what="b sees the update and the delete")
        n3 = b.create_node(new_node())
        eventually(lambda: [n.id for n in a.list_nodes()] == [n1.id, n3.id], what="a sees n3")

    def test_node_changes_tell_what_changed_since_a_position(self, store_factory):
        a, b = store_factory(), store_factory()
        keep = a.create_node(new_node())
        gone = a.create_node(new_node())
        eventually(lambda: {n.id for n in b.list_nodes()} == {keep.id, gone.id}, what="b sees")
        position, changes = b.node_changes(None)
        assert changes is None                       # first call: read everything
        assert b.node_changes(position)[1] == {}     # nothing since
        keep.state = NodeState.USED
        a.update_node(keep)
        a.delete_node(gone.id)
        new = a.create_node(new_node())

        def caught_up():
            pos, got = b.node_changes(position)
            return got if set(got) == {keep.id, gone.id, new.id} else None
        got = eventually(caught_up, what="b's change feed catches up")
        assert got[gone.id] is None
        assert got[keep.id].state == NodeState.USED
        assert got[new.id].id == new.id
        # the records are the listing's own (shared) objects
        listed = {n.id: n for n in b.list_nodes(shared=True)}
        assert got[keep.id] is listed[keep.id]
        # a position the store never gave is answered with "read everything"
        assert b.node_changes(10 ** 9)[1] is None

    def test_request_changes_tell_what_changed_since_a_position(self, store_factory):
        a, b = store_factory(), store_factory()
        keep = a.submit_request(NodeRequest(node_types=["small"]))
        gone = a.submit_request(NodeRequest(node_types=["small"]))
        eventually(lambda: {r.id for r in b.list_requests()} == {keep.id, gone.id}, what="b sees")
        position, changes = b.request_changes(None)
        assert changes is None                       # first call: read everything
        assert b.request_changes(position)[1] == {}  # nothing since
        keep.state = RequestState.PENDING
        a.update_request(keep)
        a.delete_request(gone.id)
        new = a.submit_request(NodeRequest(node_types=["big"]))

        def caught_up():
            pos, got = b.request_changes(position)
            return got if set(got) == {keep.id, gone.id, new.id} else None
        got = eventually(caught_up, what="b's change feed catches up")
        assert got[gone.id] is None
        assert got[keep.id].state == RequestState.PENDING
        assert got[new.id].node_types == ["big"]
        listed = {r.id: r for r in b.list_requests(shared=True)}
        assert got[keep.id] is listed[keep.id]
        assert b.request_changes(10 ** 9)[1] is None

    def test_deleting_a_locked_node_releases_its_lock(self, store_factory):
        a, b = store_factory(), store_factory()
        node = a.create_node(new_node())
        lock = a.lock_node(node.id)
        node.state = NodeState.DELETED
        a.update_node(node)
        a.delete_node(node.id)
        assert a.get_node(node.id) is None and b.get_node(node.id) is None
        assert not b.is_node_locked(node.id)
        lock.release()                                 # harmless afterwards
        assert not a.holds(lock)
        eventually(lambda: node.id not in {n.id for n in b.list_nodes()}, what="b sees it go")

    def test_unknown_node_fields_survive_an_update(self, store_factory):
        a, b = store_factory(), store_factory()
        written = Node.from_dict({"state": "ready", "type": "legacy-label", "provider": "p1",
                                  "zuul_private": {"nested": [1, 2]}, "future_key": "x"})
        a.create_node(written)
        got = b.get_node(written.id)
        assert got.type == ["legacy-label"]
        assert got.extra["zuul_private"] == {"nested": [1, 2]}
        got.state = NodeState.IN_USE
        b.update_node(got)
        again = a.get_node(written.id)
        assert again.state == NodeState.IN_USE
        assert again.extra == {"zuul_private": {"nested": [1, 2]}, "future_key": "x"}
        assert again.to_dict()["zuul_private"] == {"nested": [1, 2]}
        listed = eventually(lambda: [n for n in a.list_nodes()
                                     if n.state == NodeState.IN_USE], what="listing")
        assert listed[0].extra["future_key"] == "x"

    def test_delete_node_removes_its_lock(self, store_factory):
        a, b = store_factory(), store_factory()
        node = a.create_node(new_node())
        a.lock_node(node.id)
        assert b.is_node_locked(node.id)
        a.delete_node(node.id)
        assert not b.is_node_locked(node.id)
        assert not a.is_locked(node_lock_path(node.id))

    # -- node requests -----------------------------------------------------------------------------

    def test_submit_request_ids_share_one_sequence(self, store):
        r1 = store.submit_request(NodeRequest(node_types=["small"]), priority="200")
        r2 = store.submit_request(NodeRequest(node_types=["small"]), priority="100")
        m1, m2 = REQUEST_ID.match(r1.id), REQUEST_ID.match(r2.id)
        assert m1 and m2
        assert (m1.group(1), m2.group(1)) == ("200", "100")
        assert int(m2.group(2)) > int(m1.group(2))
        assert r1.priority == "200" and r1.version is not None
        assert r1.created_time is not None and r1.state_time is not None

    def test_request_crud(self, store_factory):
        a, b = store_factory(), store_factory()
        req = a.submit_request(NodeRequest(node_types=["small", "small"], requestor="zuul"))
        got = b.get_request(req.id)
        assert got.node_types == ["small", "small"]
        assert got.requestor == "zuul"
        assert got.state == RequestState.REQUESTED
        got.set_state(RequestState.PENDING)
        got.declined_by.append("p1-main")
        first = got.version
        b.update_request(got)
        assert got.version > first
        again = a.get_request(req.id)
        assert again.state == RequestState.PENDING
        assert again.declined_by == ["p1-main"]
        a.delete_request(req.id)
        assert b.get_request(req.id) is None
        with pytest.raises(NotFoundError):
            b.update_request(got)
        a.delete_request(req.id)          # missing is not an error
        assert a.get_request("100-9999999999") is None

    def test_request_compare_and_set(self, store_factory):
        a, b = store_factory(), store_factory()
        req = a.submit_request(NodeRequest(node_types=["small"]))
        mine, theirs = a.get_request(req.id), b.get_request(req.id)
        theirs.state = RequestState.PENDING
        b.update_request(theirs, check_version=True)
        mine.state = RequestState.FAILED
        with pytest.raises(ConflictError):
            a.update_request(mine, check_version=True)
        assert b.get_request(req.id).state == RequestState.PENDING

    def test_update_together_writes_all_or_nothing(self, store_factory):
        a, b = store_factory(), store_factory()
        node = a.create_node(new_node())
        req = a.submit_request(NodeRequest(node_types=["small"]))
        # all: each record written, versions bumped, seen by another session and its cache
        n, r = a.get_node(node.id), a.get_request(req.id)
        versions = (n.version, r.version)
        n.allocated_to = req.id
        r.state, r.nodes = RequestState.FULFILLED, [node.id]
        locks = [a.lock_node(node.id), a.lock_request(req.id)]
        a.update_together(nodes=[n], requests=[r], release=locks)
        assert (n.version, r.version) != versions
        # the locks went with the write: free for others, and released for us
        assert all(lock.released and not a.holds(lock) for lock in locks)
        theirs = b.lock_node(node.id)
        theirs.release()
        locks[0].release()          # releasing again is a no-op
        assert b.get_node(node.id).allocated_to == req.id
        assert b.get_request(req.id).state == RequestState.FULFILLED
        eventually(lambda: any(x.id == node.id and x.allocated_to == req.id
                               for x in b.list_nodes()), what="b's listing of the write")
        # nothing: one stale record fails the write of the others
        stale_node, fresh_req = a.get_node(node.id), a.get_request(req.id)
        theirs = b.get_node(node.id)
        theirs.comment = "theirs"
        b.update_node(theirs, check_version=True)
        stale_node.allocated_to = None
        fresh_req.state = RequestState.FAILED
        mine = a.lock_request(req.id)
        with pytest.raises(ConflictError):
            a.update_together(nodes=[stale_node], requests=[fresh_req], release=[mine])
        assert a.holds(mine)        # a failed write releases nothing
        with pytest.raises(LockError):
            b.lock_request(req.id)
        mine.release()
        assert b.get_request(req.id).state == RequestState.FULFILLED
        assert a.get_node(node.id).allocated_to == req.id
        # a request deleted by the write, with our lock on it; a missing one is no error
        extra = a.submit_request(NodeRequest(node_types=["small"]))
        elock = a.lock_request(extra.id)
        n = a.get_node(node.id)
        n.comment = "stock"
        a.update_together(nodes=[n], release=[elock],
                          delete_requests=[extra.id, "100-9999999999"])
        assert b.get_request(extra.id) is None and elock.released
        assert b.get_node(node.id).comment == "stock"
        eventually(lambda: extra.id not in [r.id for r in a.list_requests()],
                   what="the deleted request gone from a's listing")
        theirs = b.get_node(node.id)
        theirs.comment = "theirs"
        b.update_node(theirs, check_version=True)
        # a record gone is NotFoundError, and the others are left as they were
        fresh_node = a.get_node(node.id)
        b.delete_request(req.id)
        fresh_node.comment = "mine"
        with pytest.raises(NotFoundError):
            a.update_together(nodes=[fresh_node], requests=[fresh_req])
        assert b.get_node(node.id).comment == "theirs"
        eventually(lambda: any(x.id == node.id and x.comment == "theirs"
                               for x in a.list_nodes()), what="a's cache after the failure")

    def test_list_requests_in_handling_order(self, store_factory):
        a, b = store_factory(), store_factory()
        low = a.submit_request(NodeRequest(node_types=["x"]), priority="300")
        first = a.submit_request(NodeRequest(node_types=["x"]), priority="100")
        later_rel = a.submit_request(NodeRequest(node_types=["x"], relative_priority=5),
                                     priority="100")
        second = a.submit_request(NodeRequest(node_types=["x"]), priority="100")
        high = a.submit_request(NodeRequest(node_types=["x"]), priority="050")
        expected = [high.id, first.id, second.id, later_rel.id, low.id]
        assert [r.id for r in a.list_requests()] == expected
        eventually(lambda: [r.id for r in b.list_requests()] == expected, what="b's listing")

    def test_list_requests_returns_fresh_objects(self, store):
        req = store.submit_request(NodeRequest(node_types=["small"]))
        listed = store.list_requests()[0]
        listed.declined_by.append("somebody")
        listed.nodes.append("0000000001")
        again = store.list_requests()[0]
        assert again.id == req.id
        assert again.declined_by == [] and again.nodes == []

    def test_ephemeral_requests_vanish_with_their_owner(self, store_factory):
        owner, other = store_factory(), store_factory()
        eph = owner.submit_request(NodeRequest(node_types=["small"]))
        kept = owner.submit_request(NodeRequest(node_types=["small"]), ephemeral=False)
        assert other.get_request(eph.id) is not None
        eventually(lambda: len(other.list_requests()) == 2, what="both requests listed")
        owner.stop()
        eventually(lambda: other.get_request(eph.id) is None, what="ephemeral request removed")
        assert other.get_request(kept.id) is not None
        eventually(lambda: [r.id for r in other.list_requests()] == [kept.id],
                   what="listing without the ephemeral request")

    def test_unknown_request_fields_survive_an_update(self, store_factory):
        a, b = store_factory(), store_factory()
        req = NodeRequest.from_dict({"node_types": ["small"], "state": "requested",
                                     "zuul_extra": {"k": "v"}})
        a.submit_request(req)
        got = b.get_request(req.id)
        got.state = RequestState.PENDING
        b.update_request(got)
        assert a.get_request(req.id).extra["zuul_extra"] == {"k": "v"}

    # -- locks -------------------------------------------------------------------------------------

    def test_lock_is_exclusive_across_store_objects(self, store_factory):
        a, b = store_factory(), store_factory()
        path = node_lock_path(a.create_node(new_node()).id)
        lock = a.lock(path, identifier="launcher-a")
        assert isinstance(lock, Lock) and lock.path == path
        assert a.is_locked(path) and b.is_locked(path)
        with pytest.raises(LockError):
            b.lock(path)
        lock.release()
        eventually(lambda: not b.is_locked(path), what="lock released")
        with b.lock(path):
            with pytest.raises(LockError):
                a.lock(path)
        eventually(lambda: not a.is_locked(path), what="lock released by the with block")

    def test_try_locks_takes_the_free_ones(self, store_factory):
        a, b = store_factory(), store_factory()
        node = a.create_node(new_node())
        req = a.submit_request(NodeRequest(node_types=["small"]))
        theirs = b.lock_node(node.id)
        new_req = a.submit_request(NodeRequest(node_types=["small"]))   # no lock directory yet
        locks = a.try_locks([request_lock_path(req.id), node_lock_path(node.id),
                             request_lock_path(new_req.id), request_lock_path(req.id)])
        assert [lock is not None for lock in locks] == [True, False, True, False]
        assert a.holds(locks[0]) and a.holds(locks[2])
        with pytest.raises(LockError):
            b.lock_request(req.id)
        theirs.release()
        for lock in locks[0], locks[2]:
            lock.release()
        # every lock released is free for others
        again = b.try_locks([request_lock_path(req.id), request_lock_path(new_req.id),
                             node_lock_path(node.id)])
        assert all(again)
        for lock in again:
            lock.release()

    def test_lock_is_not_reentrant(self, store):
        lock = store.lock(request_lock_path("100-0000000001"))
        with pytest.raises(LockError):
            store.lock(request_lock_path("100-0000000001"))
        with pytest.raises(LockError):
            store.lock(request_lock_path("100-0000000001"), blocking=True, timeout=0.2)
        lock.release()
        lock.release()            # twice is harmless
        store.lock(request_lock_path("100-0000000001")).release()

    def test_blocking_lock_times_out(self, store_factory):
        a, b = store_factory(), store_factory()
        a.lock(image_build_lock_path("ubuntu"))
        with pytest.raises(LockError):
            b.lock(image_build_lock_path("ubuntu"), blocking=True, timeout=0.3)

    def test_blocking_lock_waits_for_release(self, store_factory):
        a, b = store_factory(), store_factory()
        path = upload_lock_path("ubuntu", "abc", "p1")
        held = a.lock(path)
        got = []
        waiter = threading.Thread(
            target=lambda: got.append(b.lock(path, blocking=True, timeout=WAIT)))
        waiter.start()
        time.sleep(0.1)           # let the waiter start waiting; correctness does not depend on it
        assert not got
        held.release()
        waiter.join(WAIT + 5)
        assert len(got) == 1 and got[0].path == path
        with pytest.raises(LockError):
            a.lock(path)
        got[0].release()

    def test_locks_are_released_when_the_owner_stops(self, store_factory):
        a, b = store_factory(), store_factory()
        node_id = a.create_node(new_node()).id
        a.lock_node(node_id)
        a.lock_request("100-0000000003")
        with pytest.raises(LockError):
            b.lock_node(node_id)
        a.stop()
        a.stop()                  # idempotent
        eventually(lambda: not b.is_node_locked(node_id), what="lock released")
        b.lock_node(node_id, blocking=True, timeout=WAIT)
        b.lock_request("100-0000000003", blocking=True, timeout=WAIT)

    def test_locked_node_and_request_ids(self, store_factory):
        a, b = store_factory(), store_factory()
        nodes = [a.create_node(new_node()) for _ in range(3)]
        reqs = [a.submit_request(NodeRequest(node_types=["small"])) for _ in range(2)]
        a.lock_node(nodes[1].id)
        b.lock_request(reqs[0].id)
        eventually(lambda: b.locked_node_ids() == {nodes[1].id}, what="locked node ids")
        eventually(lambda: a.locked_request_ids() == {reqs[0].id}, what="locked request ids")
        assert a.is_node_locked(nodes[1].id) and not a.is_node_locked(nodes[0].id)
        assert a.is_request_locked(reqs[0].id) and not b.is_request_locked(reqs[1].id)

    # -- change notification -----------------------------------------------------------------------

    def test_watch_fires_on_another_store_write(self, store_factory):
        a, b = store_factory(), store_factory()
        watcher = a.watch()
        assert isinstance(watcher, ChangeWatcher)
        drain(watcher)
        node = b.create_node(new_node())
        assert watcher.wait(WAIT)
        drain(watcher)
        node.state = NodeState.USED
        b.update_node(node)
        assert watcher.wait(WAIT)
        drain(watcher)
        b.submit_request(NodeRequest(node_types=["small"]))
        assert watcher.wait(WAIT)

    def test_watch_fires_on_own_write(self, store):
        watcher = store.watch()
        drain(watcher)
        store.create_node(new_node())
        assert watcher.wait(WAIT)

    def test_sync_nodes_sees_every_earlier_write(self, store_factory):
        """After ``sync_nodes`` the listing has every node write another store committed
        before the call: creates, changes and deletes, with no wait."""
        a, b = store_factory(), store_factory()
        a.list_nodes()                       # a's cache (if it keeps one) is running
        for i in range(20):
            node = b.create_node(new_node())
            a.sync_nodes()
            assert node.id in {n.id for n in a.list_nodes()}
            node.state = NodeState.USED
            b.update_node(node)
            a.sync_nodes()
            assert {n.id: n.state for n in a.list_nodes()}[node.id] == NodeState.USED
            b.delete_node(node.id)
            a.sync_nodes()
            assert node.id not in {n.id for n in a.list_nodes()}

    def test_last_wake_after_own_write_sees_it(self, store):
        """A loop that reads the store each time it wakes must see its own process's writes:
        a wake-up that came before the written record was readable (ZooKeeper sends the watch
        event before the write's answer) must be followed by another one."""
        watcher = store.watch()
        node = store.create_node(new_node())
        seen = {}
        stop = threading.Event()

        def reader():
            while not stop.is_set():
                if watcher.wait(0.05):
                    for n in store.list_nodes(shared=True):
                        if n.id == node.id:
                            seen["state"] = n.state

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for state in [NodeState.BUILDING, NodeState.READY] * 6:
                node.state = state
                store.update_node(node)
                deadline = time.monotonic() + WAIT
                while seen.get("state") != state and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert seen.get("state") == state
        finally:
            stop.set()
            thread.join()

    # -- images ------------------------------------------------------------------------------------

    def test_build_crud(self, store_factory):
        a, b = store_factory(), store_factory()
        build = a.create_build(ImageBuild(image="ubuntu", builder="b1", formats="qcow2,raw"))
        assert re.match(r"^[0-9a-f]{32}$", build.id)
        got = b.get_build("ubuntu", build.id)
        assert (got.image, got.id, got.builder) == ("ubuntu", build.id, "b1")
        assert got.format_list == ["qcow2", "raw"]
        assert got.state == BuildState.BUILDING
        got.set_state(BuildState.READY)
        first = got.version
        b.update_build(got)
        assert got.version > first
        assert a.get_build("ubuntu", build.id).state == BuildState.READY
        stale = a.get_build("ubuntu", build.id)
        got.state = BuildState.DELETING
        b.update_build(got)
        with pytest.raises(ConflictError):
            a.update_build(stale, check_version=True)
        assert a.get_build("ubuntu", "0" * 32) is None

    def test_build_with_given_id(self, store):
        build = store.create_build(ImageBuild(image="debian", id="0000000042"))
        assert build.id == "0000000042"
        assert store.get_build("debian", "0000000042") is not None

    def test_missing_image_records(self, store):
        assert store.get_build("img", "nope") is None
        assert store.get_upload("img", "nope", "p", "0000000001") is None
        with pytest.raises(NotFoundError):
            store.update_build(ImageBuild(image="img", id="nope"))

    def test_list_builds_oldest_first(self, store):
        ids = []
        for image in ("ubuntu", "debian", "ubuntu"):
            ids.append((image, store.create_build(ImageBuild(image=image)).id))
        assert [(b.image, b.id) for b in store.list_builds()] == ids
        assert [b.id for b in store.list_builds("ubuntu")] == [ids[0][1], ids[2][1]]
        assert store.list_builds("centos") == []

    def test_uploads_ids_attributes_and_filters(self, store_factory):
        a, b = store_factory(), store_factory()
        build = a.create_build(ImageBuild(image="ubuntu"))
        u1 = a.create_upload(ImageUpload(image="ubuntu", build_id=build.id, provider="p1"))
        u2 = a.create_upload(ImageUpload(image="ubuntu", build_id=build.id, provider="p1"))
        u3 = a.create_upload(ImageUpload(image="ubuntu", build_id=build.id, provider="p2"))
        for u in (u1, u2, u3):
            assert TEN_DIGITS.match(u.id)
        # one sequence per (build, provider): ZooKeeper counts from 0, SQLite from 1
        assert int(u2.id) == int(u1.id) + 1 and u3.id == u1.id
        got = b.get_upload("ubuntu", build.id, "p1", u2.id)
        assert (got.image, got.build_id, got.provider, got.id) == ("ubuntu", build.id, "p1", u2.id)
        assert got.state == UploadState.UPLOADING
        assert [u.id for u in b.list_uploads("ubuntu", build.id, "p1")] == [u1.id, u2.id]
        assert [(u.provider, u.id) for u in b.list_uploads(provider="p2")] == [("p2", u3.id)]
        assert len(b.list_uploads()) == 3
        got.set_state(UploadState.READY)
        got.external_id = "img-123"
        first = got.version
        b.update_upload(got)
        assert got.version > first
        again = a.get_upload("ubuntu", build.id, "p1", u2.id)
        assert again.external_id == "img-123" and again.state == UploadState.READY
        a.delete_upload("ubuntu", build.id, "p1", u1.id)
        assert b.get_upload("ubuntu", build.id, "p1", u1.id) is None
        assert [u.id for u in b.list_uploads("ubuntu", build.id, "p1")] == [u2.id]

    def test_upload_compare_and_set(self, store_factory):
        a, b = store_factory(), store_factory()
        build = a.create_build(ImageBuild(image="ubuntu"))
        up = a.create_upload(ImageUpload(image="ubuntu", build_id=build.id, provider="p1"))
        theirs = b.get_upload("ubuntu", build.id, "p1", up.id)
        theirs.state = UploadState.FAILED
        b.update_upload(theirs)
        up.state = UploadState.READY
        with pytest.raises(ConflictError):
            a.update_upload(up, check_version=True)

    def test_compare_and_set_rereads_after_a_concurrent_write(self, store_factory):
        from nodepool.store.base import compare_and_set
        a, b = store_factory(), store_factory()
        build = a.create_build(ImageBuild(image="ubuntu"))
        seen = []

        def mark(rec):
            seen.append(rec.extra.get("by"))
            if len(seen) == 1:               # another process writes between our read and write
                theirs = b.get_build("ubuntu", build.id)
                theirs.extra["by"] = "them"
                b.update_build(theirs)
            rec.extra["mine"] = True

        get = lambda: a.get_build("ubuntu", build.id)   # noqa: E731
        written = compare_and_set(get, a.update_build, mark)
        assert seen == [None, "them"]
        got = b.get_build("ubuntu", build.id)
        assert (got.extra["by"], got.extra["mine"]) == ("them", True)
        assert written.version == got.version
        assert compare_and_set(get, a.update_build, lambda rec: False) is None
        a.delete_build("ubuntu", build.id)
        assert compare_and_set(get, a.update_build, mark) is None

    def test_delete_build_removes_its_uploads(self, store_factory):
        a, b = store_factory(), store_factory()
        build = a.create_build(ImageBuild(image="ubuntu"))
        other = a.create_build(ImageBuild(image="ubuntu"))
        a.create_upload(ImageUpload(image="ubuntu", build_id=build.id, provider="p1"))
        a.create_upload(ImageUpload(image="ubuntu", build_id=build.id, provider="p2"))
        kept = a.create_upload(ImageUpload(image="ubuntu", build_id=other.id, provider="p1"))
        b.delete_build("ubuntu", build.id)
        assert a.get_build("ubuntu", build.id) is None
        assert a.list_uploads(build_id=build.id) == []
        assert [u.id for u in a.list_uploads("ubuntu")] == [kept.id]
        assert [x.id for x in a.list_builds("ubuntu")] == [other.id]

    def test_unknown_build_fields_survive_an_update(self, store):
        build = ImageBuild.from_dict({"state": "building", "future": [1]})
        build.image = "ubuntu"
        store.create_build(build)
        got = store.get_build("ubuntu", build.id)
        got.state = BuildState.READY
        store.update_build(got)
        assert store.get_build("ubuntu", build.id).extra == {"future": [1]}

    def test_image_pause_flags(self, store_factory):
        a, b = store_factory(), store_factory()
        assert not a.is_image_paused("ubuntu")
        a.set_image_paused("ubuntu", True)
        a.set_image_paused("ubuntu", True)        # idempotent
        assert b.is_image_paused("ubuntu")
        assert "ubuntu" in b.list_image_names()
        b.set_image_paused("ubuntu", False)
        assert not a.is_image_paused("ubuntu")
        b.set_image_paused("ubuntu", False)       # removing a missing flag is fine
        assert "ubuntu" not in a.list_image_names()

    def test_image_build_requests(self, store_factory):
        a, b = store_factory(), store_factory()
        assert a.get_image_build_request("debian") is None
        a.request_image_build("debian")
        when = b.get_image_build_request("debian")
        assert isinstance(when, (int, float)) and when > 0
        a.request_image_build("debian")           # idempotent
        assert "debian" in b.list_image_names()
        b.remove_image_build_request("debian")
        assert a.get_image_build_request("debian") is None
        b.remove_image_build_request("debian")    # missing is not an error

    def test_list_image_names(self, store):
        store.create_build(ImageBuild(image="ubuntu"))
        store.set_image_paused("centos", True)
        store.request_image_build("debian")
        assert store.list_image_names() == ["centos", "debian", "ubuntu"]

    # -- components --------------------------------------------------------------------------------

    def test_component_registration(self, store_factory):
        a, b = store_factory(), store_factory()
        launcher = a.register_component(Component(kind="launcher", hostname="host-a",
                                                  version_string="1.0"))
        pool = a.register_component(Component(kind="pool", hostname="host-a", name="main",
                                              provider_name="p1",
                                              supported_labels=["small", "large"],
                                              priority=50, pool_id="host-a-PoolWorker.p1-main"))
        builder = b.register_component(Component(kind="builder", hostname="host-b"))
        assert launcher.id and pool.id and builder.id
        # ids are unique within a kind (ZooKeeper numbers each kind's children separately)
        every = {(c.kind, c.id) for c in (launcher, pool, builder)}
        assert len(every) == 3
        pools = eventually(lambda: b.list_components("pool"), what="pool registration")
        assert [c.id for c in pools] == [pool.id]
        assert pools[0].kind == "pool"
        assert pools[0].supported_labels == ["small", "large"]
        assert pools[0].pool_id == "host-a-PoolWorker.p1-main"
        assert (pools[0].name, pools[0].provider_name, pools[0].priority) == ("main", "p1", 50)
        assert [c.version_string for c in b.list_components("launcher")] == ["1.0"]
        assert {(c.kind, c.id) for c in a.list_components()} == every
        pool.paused = True
        pool.supported_labels = ["small"]
        a.update_component(pool)
        eventually(lambda: b.list_components("pool")[0].paused, what="paused pool")
        assert b.list_components("pool")[0].supported_labels == ["small"]
        a.unregister_component(launcher)
        a.unregister_component(launcher)          # missing is not an error
        eventually(lambda: b.list_components("launcher") == [], what="launcher unregistered")

    def test_components_vanish_with_their_owner(self, store_factory):
        a, b = store_factory(), store_factory()
        a.register_component(Component(kind="launcher", hostname="host-a"))
        kept = b.register_component(Component(kind="builder", hostname="host-b"))
        a.stop()
        eventually(lambda: [c.id for c in b.list_components()] == [kept.id],
                   what="a's registration removed")
