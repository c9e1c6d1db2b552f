"""Behaviour every state store must have (``nodepool/store/base.py``), run against each one.

A test module subclasses ``StoreContract`` and provides a ``store_factory`` fixture: a callable
returning a new *started* store object (its own session) on the same shared backing data.
"""
import threading
import time

import pytest

from nodepool.errors import ConflictError, LockError, NotFoundError
from nodepool.model import (Component, ImageBuild, ImageUpload, Node, NodeRequest, NodeState,
                            RequestState)
from nodepool.store.base import image_build_lock_path, node_lock_path


def eventually(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


class StoreContract:
    # -- nodes -------------------------------------------------------------------------------------

    def test_node_create_get_update_delete(self, store_factory):
        store = store_factory()
        node = store.create_node(Node(state=NodeState.BUILDING, provider="p", pool="main",
                                      type=["small"]))
        assert len(node.id) == 10 and node.id.isdigit()
        assert node.created_time and node.state_time
        got = store.get_node(node.id)
        assert got.state == NodeState.BUILDING and got.type == ["small"]
        got.set_state(NodeState.READY)
        got.external_id = "i-1"
        store.update_node(got)
        again = store.get_node(node.id)
        assert again.state == NodeState.READY and again.external_id == "i-1"
        store.delete_node(node.id)
        assert store.get_node(node.id) is None
        store.delete_node(node.id)          # missing: not an error
        assert store.get_node("9999999999") is None

    def test_node_ids_are_increasing_and_never_reused(self, store_factory):
        store = store_factory()
        a = store.create_node(Node(provider="p"))
        store.delete_node(a.id)
        b = store.create_node(Node(provider="p"))
        assert int(b.id) > int(a.id)

    def test_update_of_deleted_node_raises_not_found(self, store_factory):
        store = store_factory()
        node = store.create_node(Node(provider="p"))
        store.delete_node(node.id)
        with pytest.raises(NotFoundError):
            store.update_node(node)

    def test_compare_and_set(self, store_factory):
        one, two = store_factory(), store_factory()
        node = one.create_node(Node(provider="p"))
        copy = two.get_node(node.id)
        copy.comment = "first"
        two.update_node(copy, check_version=True)
        node.comment = "stale"
        with pytest.raises(ConflictError):
            one.update_node(node, check_version=True)
        fresh = one.get_node(node.id)
        fresh.comment = "second"
        one.update_node(fresh, check_version=True)
        assert two.get_node(node.id).comment == "second"

    def test_list_nodes_sees_other_sessions_writes(self, store_factory):
        one, two = store_factory(), store_factory()
        node = one.create_node(Node(provider="p", type=["x"]))
        assert eventually(lambda: [n.id for n in two.list_nodes()] == [node.id])
        node.set_state(NodeState.READY)
        one.update_node(node)
        assert eventually(lambda: two.list_nodes()[0].state == NodeState.READY)
        one.delete_node(node.id)
        assert eventually(lambda: two.list_nodes() == [])

    def test_listed_records_are_copies(self, store_factory):
        store = store_factory()
        store.create_node(Node(provider="p", type=["x"]))
        store.list_nodes()[0].type.append("mutated")
        assert store.list_nodes()[0].type == ["x"]

    def test_unknown_fields_survive_a_rewrite(self, store_factory):
        store = store_factory()
        node = Node.from_dict({"state": "ready", "type": ["x"], "zuul_private": {"a": 1}})
        store.create_node(node)
        got = store.get_node(node.id)
        got.comment = "touched"
        store.update_node(got)
        assert store.get_node(node.id).to_dict()["zuul_private"] == {"a": 1}

    # -- requests ----------------------------------------------------------------------------------

    def test_requests_ids_and_handling_order(self, store_factory):
        store = store_factory()
        low = store.submit_request(NodeRequest(node_types=["a"]), priority="300")
        high = store.submit_request(NodeRequest(node_types=["a"]), priority="100")
        rel = store.submit_request(NodeRequest(node_types=["a"], relative_priority=5),
                                   priority="100")
        first = store.submit_request(NodeRequest(node_types=["a"]), priority="100")
        assert low.id.startswith("300-") and len(low.id) == 14
        assert [r.id for r in store.list_requests()] == [high.id, first.id, rel.id, low.id]

    def test_request_update_and_delete(self, store_factory):
        store = store_factory()
        req = store.submit_request(NodeRequest(node_types=["a", "a"], requestor="me"))
        got = store.get_request(req.id)
        assert got.node_types == ["a", "a"] and got.state == RequestState.REQUESTED
        got.set_state(RequestState.PENDING)
        store.update_request(got)
        assert store.get_request(req.id).state == RequestState.PENDING
        store.delete_request(req.id)
        assert store.get_request(req.id) is None
        with pytest.raises(NotFoundError):
            store.update_request(got)

    def test_ephemeral_requests_vanish_with_their_session(self, store_factory):
        owner, other = store_factory(), store_factory()
        eph = owner.submit_request(NodeRequest(node_types=["a"]), ephemeral=True)
        per = owner.submit_request(NodeRequest(node_types=["a"]), ephemeral=False)
        assert eventually(lambda: len(other.list_requests()) == 2)
        owner.stop()
        assert eventually(lambda: other.get_request(eph.id) is None)
        assert other.get_request(per.id) is not None

    # -- locks -------------------------------------------------------------------------------------

    def test_lock_is_exclusive_across_sessions(self, store_factory):
        one, two = store_factory(), store_factory()
        node = one.create_node(Node(provider="p"))
        lock = one.lock_node(node.id)
        assert two.is_node_locked(node.id)
        with pytest.raises(LockError):
            two.lock_node(node.id)
        assert node.id in two.locked_node_ids()
        lock.release()
        assert eventually(lambda: not two.is_node_locked(node.id))
        with two.lock_node(node.id):
            assert one.is_node_locked(node.id)

    def test_locks_are_not_reentrant(self, store_factory):
        store = store_factory()
        with store.lock(image_build_lock_path("img")):
            with pytest.raises(LockError):
                store.lock(image_build_lock_path("img"))

    def test_blocking_lock_waits_for_release_or_times_out(self, store_factory):
        one, two = store_factory(), store_factory()
        path = image_build_lock_path("img")
        lock = one.lock(path)
        with pytest.raises(LockError):
            two.lock(path, blocking=True, timeout=0.3)
        threading.Timer(0.2, lock.release).start()
        got = two.lock(path, blocking=True, timeout=10)
        got.release()

    def test_locks_are_released_when_the_session_stops(self, store_factory):
        one, two = store_factory(), store_factory()
        req = two.submit_request(NodeRequest(node_types=["a"]), ephemeral=False)
        one.lock_request(req.id)
        assert req.id in two.locked_request_ids()
        one.stop()
        assert eventually(lambda: req.id not in two.locked_request_ids())
        two.lock_request(req.id).release()

    def test_deleting_a_node_removes_its_lock(self, store_factory):
        store = store_factory()
        node = store.create_node(Node(provider="p"))
        store.lock_node(node.id)
        store.delete_node(node.id)
        assert not store.is_locked(node_lock_path(node.id))

    # -- watches -----------------------------------------------------------------------------------

    def test_watch_wakes_on_another_sessions_write(self, store_factory):
        one, two = store_factory(), store_factory()
        watcher = two.watch()
        watcher.wait(0.2)                 # swallow anything pending
        one.submit_request(NodeRequest(node_types=["a"]))
        assert watcher.wait(10)

    # -- components --------------------------------------------------------------------------------

    def test_components_register_update_and_vanish_with_session(self, store_factory):
        one, two = store_factory(), store_factory()
        comp = one.register_component(Component(kind="pool", hostname="h", name="main",
                                                provider_name="p", supported_labels=["a"],
                                                pool_id="h-PoolWorker.p-main-1"))
        one.register_component(Component(kind="launcher", hostname="h"))
        assert eventually(lambda: len(two.list_components()) == 2)
        pools = two.list_components("pool")
        assert [c.pool_id for c in pools] == ["h-PoolWorker.p-main-1"]
        assert pools[0].supported_labels == ["a"] and pools[0].kind == "pool"
        comp.paused = True
        one.update_component(comp)
        assert eventually(lambda: two.list_components("pool")[0].paused)
        one.unregister_component(comp)
        assert eventually(lambda: two.list_components("pool") == [])
        one.stop()
        assert eventually(lambda: two.list_components() == [])

    # -- images ------------------------------------------------------------------------------------

    def test_builds_uploads_and_image_flags(self, store_factory):
        store = store_factory()
        build = store.create_build(ImageBuild(image="img", builder="b", formats="qcow2,raw"))
        assert len(build.id) == 32
        assert store.get_build("img", build.id).format_list == ["qcow2", "raw"]
        u1 = store.create_upload(ImageUpload(image="img", build_id=build.id, provider="p1"))
        u2 = store.create_upload(ImageUpload(image="img", build_id=build.id, provider="p1"))
        u3 = store.create_upload(ImageUpload(image="img", build_id=build.id, provider="p2"))
        # a 10-digit sequence per (build, provider): ZooKeeper counts from 0, SQLite from 1
        assert all(len(u.id) == 10 and u.id.isdigit() for u in (u1, u2, u3))
        assert int(u2.id) == int(u1.id) + 1 and u3.id == u1.id
        got = store.get_upload("img", build.id, "p1", u2.id)
        got.set_state("ready")
        got.external_id = "ami-1"
        store.update_upload(got)
        ready = [u for u in store.list_uploads(image="img", provider="p1") if u.state == "ready"]
        assert [(u.id, u.external_id, u.build_id, u.provider) for u in ready] == \
            [(u2.id, "ami-1", build.id, "p1")]
        assert "img" in store.list_image_names()
        store.set_image_paused("img", True)
        assert store.is_image_paused("img")
        store.set_image_paused("img", False)
        assert not store.is_image_paused("img")
        store.request_image_build("img")
        store.request_image_build("img")
        assert store.get_image_build_request("img") is not None
        store.remove_image_build_request("img")
        assert store.get_image_build_request("img") is None
        store.delete_build("img", build.id)
        assert store.get_build("img", build.id) is None
        assert store.list_uploads(image="img") == []

    def test_missing_image_records(self, store_factory):
        store = store_factory()
        assert store.get_build("img", "nope") is None
        assert store.get_upload("img", "nope", "p", "0000000001") is None
        with pytest.raises(NotFoundError):
            store.update_build(ImageBuild(image="img", id="nope"))
