"""ZooKeeperStore against a real ZooKeeper server: Nodepool's exact paths and JSON, interop with
raw kazoo clients (the way Zuul talks to Nodepool), TLS, and session loss / server restart."""
import json
import os
import threading
import time

import pytest
from kazoo.client import KazooClient
from kazoo.recipe.lock import Lock as KazooLock

from nodepool.errors import ConflictError, LockError, NotFoundError, StoreError
from nodepool.model.records import Component, ImageBuild, ImageUpload, Node, NodeRequest
from nodepool.model.states import NodeState, RequestState
from nodepool.store.base import node_lock_path, request_lock_path
from nodepool.store.zookeeper import ZooKeeperStore

pytestmark = pytest.mark.slow

WAIT = 20.0


def wait_for(predicate, timeout=WAIT, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def make_store(zookeeper_server, zk_chroot):
    stores = []

    def make(**kwargs):
        kwargs.setdefault("chroot", zk_chroot)
        kwargs.setdefault("timeout", 5.0)
        store = ZooKeeperStore(kwargs.pop("hosts", zookeeper_server.hosts), **kwargs)
        store.start()
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.stop()


@pytest.fixture
def store(make_store):
    return make_store()


def raw_json(client, path):
    data, _ = client.get(path)
    return json.loads(data.decode("utf-8"))


# -- paths and JSON ------------------------------------------------------------------------------

def test_node_written_at_nodepool_path_with_nodepool_json(store, zk_raw):
    node = store.create_node(Node(provider="p1", pool="main", type=["small"],
                                  state=NodeState.BUILDING))
    assert len(node.id) == 10 and node.id.isdigit()
    assert zk_raw.get_children("/nodepool/nodes") == [node.id]
    d = raw_json(zk_raw, f"/nodepool/nodes/{node.id}")
    assert d["state"] == "building" and d["type"] == ["small"] and d["provider"] == "p1"
    assert d["created_time"] == d["state_time"]
    for key in ("allocated_to", "interface_ip", "hold_expiration", "connection_port", "ssh_port",
                "host_keys", "username", "driver_data", "node_properties", "slot"):
        assert key in d


def test_request_ids_and_ephemerality(store, make_store, zk_raw):
    r1 = store.submit_request(NodeRequest(node_types=["small"], requestor="zuul"), priority="200")
    r2 = store.submit_request(NodeRequest(node_types=["small"]), priority="100", ephemeral=False)
    assert r1.id.startswith("200-") and len(r1.id) == 14
    assert zk_raw.exists(f"/nodepool/requests/{r1.id}").ephemeralOwner != 0
    assert zk_raw.exists(f"/nodepool/requests/{r2.id}").ephemeralOwner == 0
    d = raw_json(zk_raw, f"/nodepool/requests/{r1.id}")
    assert d["state"] == "requested" and d["node_types"] == ["small"] and d["event_id"]
    # handling order: priority prefix first
    assert [r.id for r in store.list_requests()] == [r2.id, r1.id]
    store.stop()
    assert zk_raw.exists(f"/nodepool/requests/{r1.id}") is None     # went with the session
    assert zk_raw.exists(f"/nodepool/requests/{r2.id}") is not None


def test_images_builds_uploads_paths(store, zk_raw):
    build = store.create_build(ImageBuild(image="debian", builder="b1", formats="qcow2,raw"))
    assert len(build.id) == 32 and int(build.id, 16) >= 0
    bpath = f"/nodepool/images/debian/builds/{build.id}"
    assert raw_json(zk_raw, bpath)["formats"] == "qcow2,raw"
    up = store.create_upload(ImageUpload(image="debian", build_id=build.id, provider="cloud1"))
    up2 = store.create_upload(ImageUpload(image="debian", build_id=build.id, provider="cloud1"))
    assert up.id == "0000000000" and up2.id == "0000000001"
    assert raw_json(zk_raw, f"{bpath}/providers/cloud1/images/0000000000")["state"] == "uploading"
    assert [u.id for u in store.list_uploads("debian", build.id, "cloud1")] == [up.id, up2.id]
    assert store.get_upload("debian", build.id, "cloud1", up.id).provider == "cloud1"
    with pytest.raises(NotFoundError):
        store.create_upload(ImageUpload(image="debian", build_id="nope", provider="cloud1"))

    store.set_image_paused("debian", True)
    assert zk_raw.exists("/nodepool/images/debian/pause")
    assert store.is_image_paused("debian")
    store.set_image_paused("debian", False)
    assert not store.is_image_paused("debian")
    store.request_image_build("ubuntu")
    store.request_image_build("ubuntu")
    assert zk_raw.exists("/nodepool/images/ubuntu/request-build")
    assert store.get_image_build_request("ubuntu") > 0
    assert store.list_image_names() == ["debian", "ubuntu"]
    store.remove_image_build_request("ubuntu")
    assert store.get_image_build_request("ubuntu") is None

    # a build lock must not show up as a build
    with store.lock(f"/nodepool/images/debian/builds/lock"):
        assert [b.id for b in store.list_builds("debian")] == [build.id]
    store.delete_build("debian", build.id)
    assert zk_raw.exists(bpath) is None
    assert store.list_uploads() == []


def test_component_registration_path_and_content(store, zk_raw):
    comp = store.register_component(Component(kind="pool", hostname="host1", name="main",
                                              provider_name="p1", supported_labels=["small"],
                                              pool_id="host1-PoolWorker.p1-main-abc"))
    assert comp.id.startswith("host1") and comp.id[len("host1"):].isdigit()
    assert zk_raw.get_children("/nodepool/components/pool") == [comp.id]
    data, stat = zk_raw.get(f"/nodepool/components/pool/{comp.id}")
    assert stat.ephemeralOwner != 0
    assert data.decode() == json.dumps(json.loads(data), sort_keys=True)   # sort_keys like upstream
    d = json.loads(data)
    assert d["kind"] == "pool" and d["id"] == "host1-PoolWorker.p1-main-abc"
    assert d["supported_labels"] == ["small"] and d["provider_name"] == "p1"
    comp.paused = True
    store.update_component(comp)
    assert raw_json(zk_raw, f"/nodepool/components/pool/{comp.id}")["paused"] is True
    launcher = store.register_component(Component(kind="launcher", hostname="host1"))
    assert "supported_labels" not in raw_json(zk_raw, f"/nodepool/components/launcher/{launcher.id}")
    assert {c.kind for c in store.list_components()} == {"pool", "launcher"}
    store.unregister_component(comp)
    assert store.list_components("pool") == []


# -- records written by others --------------------------------------------------------------------

def test_zuul_style_request_is_seen_quickly(store, zk_raw):
    watcher = store.watch()
    path = zk_raw.create("/nodepool/requests/100-",
                         json.dumps({"state": "requested", "node_types": ["small"],
                                     "requestor": "zuul-scheduler", "zuul_private": 7}).encode(),
                         ephemeral=True, sequence=True, makepath=True)
    request_id = path.rsplit("/", 1)[1]
    assert watcher.wait(WAIT)
    wait_for(lambda: [r.id for r in store.list_requests()] == [request_id], what="request cached")
    req = store.get_request(request_id)
    assert req.extra == {"zuul_private": 7}
    req.state = RequestState.PENDING
    store.update_request(req)
    d = raw_json(zk_raw, path)
    assert d["zuul_private"] == 7 and d["state"] == "pending"    # unknown fields preserved
    zk_raw.delete(path)
    wait_for(lambda: store.list_requests() == [], what="request dropped from cache")


def test_request_watch_follows_one_request_only(store, make_store):
    """A client waiting for its request is woken by that request alone, and its session does
    not take the whole-tree watch (a hundred clients would each get every change)."""
    other = make_store()
    req = store.submit_request(NodeRequest(node_types=["small"]))
    watcher = store.watch_request(req.id)
    other.create_node(Node(state=NodeState.READY, type=["small"]))
    unrelated = other.submit_request(NodeRequest(node_types=["big"]))
    assert not watcher.wait(0.5)
    theirs = other.get_request(req.id)
    theirs.state = RequestState.PENDING
    other.update_request(theirs)
    assert watcher.wait(WAIT)
    # as a client does: read after each wake; the wait re-armed the watch before that read,
    # so a change after the read wakes it again
    assert store.get_request(req.id).state == RequestState.PENDING
    theirs.state = RequestState.FULFILLED
    other.update_request(theirs)
    assert watcher.wait(WAIT)
    assert store.get_request(req.id).state == RequestState.FULFILLED
    # reading through the watcher: the read itself re-arms it
    assert store.read_request(req.id, watcher).state == RequestState.FULFILLED
    theirs.state = RequestState.PENDING
    other.update_request(theirs)
    assert watcher.wait(WAIT)
    assert not watcher.wait(0.3)            # nothing re-armed it since
    assert store.read_request(req.id, watcher).state == RequestState.PENDING
    other.delete_request(req.id)
    assert watcher.wait(WAIT)
    assert store.read_request(req.id, watcher) is None
    assert not store._watching
    other.delete_request(unrelated.id)


def test_record_with_missing_or_unknown_fields_reads(store, zk_raw):
    zk_raw.create("/nodepool/nodes/0000000077",
                  json.dumps({"state": "ready", "type": "small", "future": {"x": 1}}).encode(),
                  makepath=True)
    node = store.get_node("0000000077")
    assert node.state == NodeState.READY and node.type == ["small"] and node.username == "zuul"
    assert node.extra == {"future": {"x": 1}}
    wait_for(lambda: [n.id for n in store.list_nodes()] == ["0000000077"], what="node cached")
    store.update_node(node)
    assert raw_json(zk_raw, "/nodepool/nodes/0000000077")["future"] == {"x": 1}
    assert store.get_node("0000000099") is None
    assert store.get_request("100-0000000099") is None
    assert store.get_build("debian", "abc") is None
    # empty or garbage data never crashes readers
    zk_raw.create("/nodepool/nodes/0000000078", b"", makepath=True)
    zk_raw.create("/nodepool/nodes/0000000079", b"{not json", makepath=True)
    assert store.get_node("0000000078") is None and store.get_node("0000000079") is None


def test_update_conflicts_and_missing(store, make_store):
    node = store.create_node(Node(state=NodeState.BUILDING))
    other = make_store()
    theirs = other.get_node(node.id)
    theirs.state = NodeState.READY
    other.update_node(theirs, check_version=True)
    node.comment = "mine"
    with pytest.raises(ConflictError):
        store.update_node(node, check_version=True)
    store.delete_node(node.id)
    store.delete_node(node.id)     # missing is fine
    with pytest.raises(NotFoundError):
        store.update_node(theirs)
    assert store.get_node(node.id) is None


def test_write_with_release_is_one_transaction_and_survives_a_vanished_contender(
        store, make_store, zk_raw):
    node = store.create_node(Node(state=NodeState.READY, type=["small"]))
    req = store.submit_request(NodeRequest(node_types=["small"]))
    nlock, rlock = store.lock_node(node.id), store.lock_request(req.id)
    assert len(zk_raw.get_children(f"/nodepool/nodes/{node.id}/lock")) == 1
    n, r = store.get_node(node.id), store.get_request(req.id)
    n.allocated_to, r.state = req.id, RequestState.FULFILLED
    store.update_together(nodes=[n], requests=[r], release=[nlock, rlock])
    assert zk_raw.get_children(f"/nodepool/nodes/{node.id}/lock") == []
    assert zk_raw.get_children(f"/nodepool/requests-lock/{req.id}") == []
    assert raw_json(zk_raw, f"/nodepool/requests/{req.id}")["state"] == "fulfilled"
    # a request deleted in the same transaction takes our lock's directory with it
    stock = store.submit_request(NodeRequest(node_types=["small"]))
    slock, nlock = store.lock_request(stock.id), store.lock_node(node.id)
    n = store.get_node(node.id)
    n.allocated_to = None
    store.update_together(nodes=[n], release=[slock, nlock], delete_requests=[stock.id])
    assert slock.released and nlock.released
    assert zk_raw.exists(f"/nodepool/requests/{stock.id}") is None
    assert zk_raw.exists(f"/nodepool/requests-lock/{stock.id}") is None
    assert zk_raw.get_children(f"/nodepool/nodes/{node.id}/lock") == []
    # a contender deleted behind our back (by hand): the records are still written, and the
    # lock is released as usual afterwards
    nlock = store.lock_node(node.id)
    for child in zk_raw.get_children(f"/nodepool/nodes/{node.id}/lock"):
        zk_raw.delete(f"/nodepool/nodes/{node.id}/lock/{child}")
    n = store.get_node(node.id)
    n.comment = "written anyway"
    store.update_together(nodes=[n], release=[nlock])
    assert raw_json(zk_raw, f"/nodepool/nodes/{node.id}")["comment"] == "written anyway"
    assert not nlock.released
    nlock.release()
    make_store().lock_node(node.id).release()


def test_cache_follows_writes_of_another_store(store, make_store):
    other = make_store()
    watcher = store.watch()
    node = other.create_node(Node(state=NodeState.READY, type=["small"]))
    assert watcher.wait(WAIT)
    wait_for(lambda: [n.id for n in store.list_nodes()] == [node.id], what="node appears")
    node.state = NodeState.IN_USE
    other.update_node(node)
    wait_for(lambda: store.list_nodes()[0].state == NodeState.IN_USE, what="update seen")
    listed = store.list_nodes()[0]
    listed.type.append("mutated")
    assert store.list_nodes()[0].type == ["small"]      # copies, not the cache itself
    other.delete_node(node.id)
    wait_for(lambda: store.list_nodes() == [], what="delete seen")


def test_request_created_right_after_the_first_walk_is_cached(store, zk_raw):
    """A request made between the cache's first read and the moment caching is switched on
    must not be lost (the launcher would never see it: no later event mentions it)."""
    real_rewalk = store._rewalk
    created = []

    def rewalk_then_create():
        real_rewalk()
        before = store._events.qsize()
        path = zk_raw.create("/nodepool/requests/100-", b'{"state": "requested"}',
                             ephemeral=True, sequence=True, makepath=True)
        created.append(path.rsplit("/", 1)[1])
        wait_for(lambda: store._events.qsize() > before, what="watch event queued")

    store._rewalk = rewalk_then_create
    assert store.list_requests() == []      # the first walk saw nothing yet
    wait_for(lambda: [r.id for r in store.list_requests()] == created, what="request cached")


# -- locks ---------------------------------------------------------------------------------------

def test_bookkeeping_of_finished_requests_stays_bounded(store, make_store):
    """A launcher handles requests for months: nothing kept per request may outlive it."""
    requestor = make_store()

    def per_request_entries():
        sizes = {}
        for name, value in vars(store._cache).items():
            if isinstance(value, dict) and isinstance(value.get("request"), (dict, set)):
                sizes[f"cache.{name}"] = len(value["request"])
        sizes["released contenders"] = len(store._released_contenders)
        sizes["assured request locks"] = len([p for p in store._assured_lock_paths
                                              if p.startswith("/nodepool/requests-lock/")])
        return sizes

    assert store.list_requests() == []          # a launcher lists them: the cache is on
    for _ in range(150):
        req = requestor.submit_request(NodeRequest(node_types=["small"]))
        wait_for(lambda: store.get_request(req.id) is not None, what="request")
        with store.lock_request(req.id):
            got = store.get_request(req.id)
            got.state = RequestState.FULFILLED
            store.update_request(got)
        requestor.delete_request(req.id)
    wait_for(lambda: not store.list_requests(), what="requests gone from the cache")
    wait_for(lambda: max(per_request_entries().values()) <= 5,
             what=f"bounded bookkeeping (now {per_request_entries()})")


def test_locks_interoperate_with_kazoo_recipe(store, zk_raw):
    node = store.create_node(Node(state=NodeState.READY))
    path = node_lock_path(node.id)
    raw_lock = KazooLock(zk_raw, path, "zuul")
    assert raw_lock.acquire(blocking=False)
    assert store.is_locked(path)
    wait_for(lambda: node.id in store.locked_node_ids(), what="lock seen in cache")
    with pytest.raises(LockError):
        store.lock_node(node.id)
    raw_lock.release()
    wait_for(lambda: node.id not in store.locked_node_ids(), what="unlock seen")

    lock = store.lock_node(node.id, identifier="launcher")
    assert node.id in store.locked_node_ids()
    assert not KazooLock(zk_raw, path).acquire(blocking=False)
    contenders = zk_raw.get_children(path)
    assert len(contenders) == 1 and "__lock__" in contenders[0]
    with pytest.raises(LockError):
        store.lock_node(node.id)      # not re-entrant
    lock.release()
    assert not store.is_locked(path)
    assert KazooLock(zk_raw, path).acquire(blocking=False)


def test_lock_attempts_leave_no_contender_and_blocking_queues(store, zk_raw):
    """A lock tried in one round trip (create and listing sent together) follows the recipe's
    rule: held elsewhere means not ours, and our contender is gone again; a blocking attempt
    queues behind the holder and gets it when the holder lets go."""
    node = store.create_node(Node(state=NodeState.READY))
    path = node_lock_path(node.id)
    raw_lock = KazooLock(zk_raw, path, "zuul")
    assert raw_lock.acquire(blocking=False)
    for _ in range(3):
        with pytest.raises(LockError):
            store.lock_node(node.id)
    assert len(zk_raw.get_children(path)) == 1         # only the holder's contender
    got = {}
    waiter = threading.Thread(target=lambda: got.setdefault(
        "lock", store.lock(path, blocking=True, timeout=10)))
    waiter.start()
    wait_for(lambda: len(zk_raw.get_children(path)) == 2, what="our contender queued")
    raw_lock.release()
    waiter.join(15)
    assert got["lock"] is not None and store.holds(got["lock"])
    assert not KazooLock(zk_raw, path).acquire(blocking=False)
    got["lock"].release()
    assert zk_raw.get_children(path) == []


def test_request_deleted_under_our_lock_takes_the_lock_directory(store, make_store, zk_raw):
    """A request deleted by the holder of its lock goes with its lock directory (no empty
    directory for the lock collector); with another contender queued, only the request goes
    and the lock is released as usual."""
    req = store.submit_request(NodeRequest(node_types=["small"]))
    lock = store.lock_request(req.id)
    store.delete_request(req.id)
    assert zk_raw.exists(f"/nodepool/requests/{req.id}") is None
    assert zk_raw.exists(f"/nodepool/requests-lock/{req.id}") is None
    lock.release()                                    # already gone with the request
    assert store.get_request(req.id) is None

    other = make_store()
    req = store.submit_request(NodeRequest(node_types=["small"]))
    lock = store.lock_request(req.id)
    queued = {}
    waiter = threading.Thread(target=lambda: queued.setdefault(
        "lock", other.lock_request(req.id, blocking=True, timeout=10)))
    waiter.start()
    wait_for(lambda: len(zk_raw.get_children(f"/nodepool/requests-lock/{req.id}")) == 2,
             what="a second contender")
    store.delete_request(req.id)
    assert zk_raw.exists(f"/nodepool/requests/{req.id}") is None
    lock.release()
    waiter.join(15)
    assert other.holds(queued["lock"])
    queued["lock"].release()


def test_many_reads_in_few_requests(store, zk_raw):
    """Reads of many znodes (a walk, a cache catching up) go as multiRead requests: gets,
    listings and missing znodes mixed, across several requests, answered in order."""
    from nodepool.store.zookeeper import MULTI_READ_BATCH
    nodes = [store.create_node(Node(state=NodeState.READY, provider=f"p{i}"))
             for i in range(MULTI_READ_BATCH + 7)]
    paths = [f"/nodepool/nodes/{n.id}" for n in nodes]
    paths.insert(5, "/nodepool/nodes/9999999999")
    got = store._get_many(paths)
    assert got[5] == (None, None)
    del got[5]
    assert [json.loads(data)["provider"] for data, _ in got] == [n.provider for n in nodes]
    assert all(stat.version == 0 for _, stat in got)
    listed = store._children_many(["/nodepool/nodes", "/nodepool/missing"])
    assert set(listed["/nodepool/nodes"]) == {n.id for n in nodes}
    assert listed["/nodepool/missing"] == []


def test_lock_of_a_deleted_node_fails_and_never_recreates_it(store, make_store, zk_raw):
    """Another launcher deletes the node between our listing and our lock: the lock fails
    and the node's znode is not brought back (empty) by creating the lock's parents."""
    other = make_store()
    node = store.create_node(Node(state=NodeState.USED))
    store.lock_node(node.id).release()         # this session knows the lock directory
    other.delete_node(node.id)
    with pytest.raises(LockError, match="does not exist"):
        store.lock_node(node.id)
    never_locked = other.create_node(Node(state=NodeState.USED))
    other.delete_node(never_locked.id)
    with pytest.raises(LockError, match="does not exist"):
        store.lock_node(never_locked.id, blocking=True, timeout=1)
    assert zk_raw.exists(f"/nodepool/nodes/{node.id}") is None
    assert zk_raw.exists(f"/nodepool/nodes/{never_locked.id}") is None


def test_lock_whose_answer_was_lost_leaves_no_contender(store, make_store, monkeypatch):
    """The server took the lock, the answer never came: the attempt fails, and our contender,
    which would otherwise keep the node locked for our session's life, is deleted."""
    node = store.create_node(Node(type=["small"], provider="p"))
    real_wait = store._wait

    def answer_lost(result, what):
        out = real_wait(result, what)
        if what.startswith("create lock") or what.startswith("lock"):
            raise StoreError(f"ZooKeeper connection lost during {what}")
        return out
    monkeypatch.setattr(store, "_wait", answer_lost)
    with pytest.raises(StoreError):
        store.lock_node(node.id)
    monkeypatch.setattr(store, "_wait", real_wait)
    other = make_store()
    wait_for(lambda: _lockable(other, node.id), what="the node lockable again")


def _lockable(store, node_id):
    try:
        store.lock_node(node_id).release()
        return True
    except LockError:
        return False


def test_empty_node_left_by_a_client_lock_is_removed_once_unlocked(store, zk_raw):
    """Zuul's (kazoo's) lock recipe re-creates a deleted node's znode, empty, with the lock's
    parents; the launcher's cleanup removes it when nobody holds the lock, as Nodepool does."""
    node = store.create_node(Node(state=NodeState.USED))
    store.list_nodes()                              # caches on: they note empty entries
    store.delete_node(node.id)
    late = KazooLock(zk_raw, node_lock_path(node.id), "zuul")
    assert late.acquire(blocking=False)             # a client that locks it too late
    assert zk_raw.get(f"/nodepool/nodes/{node.id}")[0] == b""
    kept = store.create_node(Node(state=NodeState.READY))
    wait_for(lambda: node.id in store._empty_nodes, what="empty entry seen")
    assert store.remove_empty_nodes() == 0          # locked: left alone
    assert zk_raw.exists(f"/nodepool/nodes/{node.id}") is not None
    late.release()
    assert store.remove_empty_nodes() == 1
    assert zk_raw.exists(f"/nodepool/nodes/{node.id}") is None
    assert [n.id for n in store.list_nodes()] == [kept.id]
    assert store.get_node(kept.id) is not None and store.remove_empty_nodes() == 0


def test_request_lock_path_and_blocking_timeout(store, make_store, zk_raw):
    req = store.submit_request(NodeRequest(node_types=["small"]))
    other = make_store()
    with other.lock_request(req.id):
        assert zk_raw.get_children(request_lock_path(req.id))
        wait_for(lambda: req.id in store.locked_request_ids(), what="request lock seen")
        with pytest.raises(LockError):
            store.lock_request(req.id, blocking=True, timeout=0.3)
    got = []
    held = other.lock_request(req.id)
    t = threading.Thread(target=lambda: got.append(store.lock_request(req.id, blocking=True,
                                                                        timeout=WAIT)))
    t.start()
    time.sleep(0.2)
    held.release()
    t.join(WAIT)
    assert got and got[0].path == request_lock_path(req.id)
    got[0].release()


# -- connections ---------------------------------------------------------------------------------

def test_stale_request_lock_directories_are_removed(store, zk_raw):
    live = store.submit_request(NodeRequest(node_types=["small"]))
    with store.lock_request(live.id):
        pass                                    # leaves requests-lock/<live id>
    gone = store.submit_request(NodeRequest(node_types=["small"]))
    with store.lock_request(gone.id):
        pass
    store.delete_request(gone.id)
    held = "100-0000009999"                     # request gone, but someone holds its lock
    raw_lock = KazooLock(zk_raw, request_lock_path(held))
    assert raw_lock.acquire(blocking=False)
    time.sleep(0.05)
    assert store.remove_stale_request_locks(3600) == 0      # none old enough
    assert store.remove_stale_request_locks(0) == 1
    left = set(zk_raw.get_children("/nodepool/requests-lock"))
    assert left == {live.id, held}
    raw_lock.release()
    time.sleep(0.05)
    assert store.remove_stale_request_locks(0) == 1
    assert set(zk_raw.get_children("/nodepool/requests-lock")) == {live.id}


def test_tls_connection(zookeeper_server, zk_chroot, zk_raw):
    store = ZooKeeperStore(zookeeper_server.tls_hosts, chroot=zk_chroot,
                           tls=zookeeper_server.tls, timeout=5.0)
    store.start()
    try:
        node = store.create_node(Node(state=NodeState.READY))
        assert zk_raw.exists(f"/nodepool/nodes/{node.id}")
    finally:
        store.stop()


def test_missing_tls_file_is_one_clear_line(zookeeper_server, tmp_path):
    ca, cert, key = zookeeper_server.tls
    store = ZooKeeperStore(zookeeper_server.tls_hosts, tls=(ca, cert, str(tmp_path / "nokey")))
    with pytest.raises(StoreError, match=r"TLS key file .*nokey.* does not exist"):
        store.start()
    bad = tmp_path / "garbage.pem"
    bad.write_text("not a certificate\n")
    store = ZooKeeperStore(zookeeper_server.tls_hosts, tls=(str(bad), cert, key))
    with pytest.raises(StoreError, match=r"CA file .*garbage.pem"):
        store.start()


def test_wrong_ca_is_a_clear_error(zookeeper_server, tmp_path):
    from fixtures.zookeeper import make_test_ca
    other = make_test_ca(tmp_path / "other-ca")
    _, cert, key = zookeeper_server.tls
    store = ZooKeeperStore(zookeeper_server.tls_hosts, tls=(other["ca"], cert, key), timeout=2.0)
    with pytest.raises(StoreError) as err:
        store.start()
    msg = str(err.value)
    assert "\n" not in msg and zookeeper_server.tls_hosts in msg and "TLS" in msg


def test_unreachable_server_fails_within_timeout():
    from fixtures.zookeeper import _free_port
    port = _free_port()
    store = ZooKeeperStore(f"127.0.0.1:{port}", timeout=1.0)
    done = []
    t = threading.Thread(target=lambda: done.append(pytest.raises(StoreError, store.start)))
    t.start()
    t.join(WAIT)
    assert done, "start() hung on an unreachable server"
    msg = str(done[0].value)
    assert f"127.0.0.1:{port}" in msg and "\n" not in msg


def test_from_config(zookeeper_server, zk_chroot):
    from nodepool.config.model import ZooKeeperServer as ZKCfg
    host, port = zookeeper_server.hosts.split(":")

    class Cfg:
        zookeeper_servers = [ZKCfg(host=host, port=int(port), chroot=zk_chroot)]
        zookeeper_tls = None
        zookeeper_timeout = 4.0

    store = ZooKeeperStore.from_config(Cfg)
    assert store.hosts == zookeeper_server.hosts and store.chroot == zk_chroot
    assert store.timeout == 4.0


# -- session loss and server restart --------------------------------------------------------------

def expire_session(zookeeper_server, store):
    """Make the server expire ``store``'s session: a second client takes it over and closes it."""
    session_id, password = store._client.client_id
    thief = KazooClient(hosts=zookeeper_server.hosts, client_id=(session_id, password),
                        timeout=5.0)
    thief.start(timeout=WAIT)
    thief.stop()
    thief.close()


def test_session_expiry_tells_listeners_and_reregisters(zookeeper_server, store, make_store,
                                                        zk_raw):
    events = []
    store.add_session_listener(events.append)
    node = store.create_node(Node(state=NodeState.READY))
    lock = store.lock_node(node.id)
    req = store.submit_request(NodeRequest(node_types=["small"]))
    comp = store.register_component(Component(kind="launcher", hostname="hostx"))
    old_session = store.session_id

    expire_session(zookeeper_server, store)
    wait_for(lambda: "lost" in events, what="lost notice")
    wait_for(lambda: "connected" in events, what="connected notice")
    assert events.index("lost") < events.index("connected")
    assert store.session_id != old_session
    assert zk_raw.exists(f"/nodepool/requests/{req.id}") is None      # ephemeral gone
    assert not store.is_node_locked(node.id)
    lock.release()                                                     # harmless
    wait_for(lambda: [c.id for c in store.list_components("launcher")] == [comp.id],
             what="component re-registered")
    assert comp.id.startswith("hostx")
    # the store works in the new session, and the cache follows again
    watcher = store.watch()
    other = make_store()
    new = other.create_node(Node(state=NodeState.READY))
    assert watcher.wait(WAIT)
    wait_for(lambda: new.id in [n.id for n in store.list_nodes()], what="cache after reconnect")
    with store.lock_node(node.id):
        pass


def test_lock_wait_spanning_a_session_loss_leaves_no_contender_behind(zookeeper_server,
                                                                       make_store, zk_raw):
    """kazoo's lock recipe re-creates its contender in the new session when the session expires
    while it waits: the store must not hand out a lock it would then never delete."""
    holder, waiter = make_store(), make_store()
    path = "/nodepool/launcher-locks/sim/main"
    lock = holder.lock(path)
    outcome = []

    def wait_for_lock():
        try:
            outcome.append(waiter.lock(path, blocking=True, timeout=15))
        except Exception as exc:   # noqa: BLE001 - the test inspects what came out
            outcome.append(exc)

    thread = threading.Thread(target=wait_for_lock)
    thread.start()
    wait_for(lambda: len(zk_raw.get_children(path)) == 2, what="the waiter queued")
    expire_session(zookeeper_server, waiter)
    wait_for(lambda: waiter.session_id is not None and len(zk_raw.get_children(path)) == 2,
             what="the waiter queued again in its new session")
    lock.release()
    thread.join(20)
    [result] = outcome
    if not isinstance(result, StoreError):       # it got the lock after all: it must own it
        result.release()
    wait_for(lambda: zk_raw.get_children(path) == [], what="no contender left")
    assert holder.lock(path, blocking=True, timeout=5)


def test_server_restart_store_recovers(zookeeper_server, store, zk_restart):
    node = store.create_node(Node(state=NodeState.READY))
    zk_restart()
    # writes work again once the client has reconnected (at most the store timeout away)
    deadline = time.monotonic() + WAIT
    while True:
        try:
            node.comment = "after restart"
            store.update_node(node)
            break
        except StoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert store.get_node(node.id).comment == "after restart"
    watcher = store.watch()
    created = store.create_node(Node(state=NodeState.READY))
    wait_for(lambda: len(store.list_nodes()) == 2, what="cache after restart")
    assert created.id in [n.id for n in store.list_nodes()]
    assert watcher.wait(WAIT)


def test_lock_released_while_disconnected_is_freed_once_connected_again(make_store, zk_raw,
                                                                         monkeypatch):
    """A release that cannot reach the server must not leave our contender behind when our
    session survives the outage: it would hold the lock until the process exits."""
    holder, other = make_store(), make_store()
    path = "/nodepool/launcher-locks/sim/main"
    lock = holder.lock(path)
    real_wait_connected = holder._wait_connected
    calls = []

    def suspended_once():
        if not calls:
            calls.append(1)
            raise StoreError("ZooKeeper connection is suspended (simulated)")
        return real_wait_connected()

    monkeypatch.setattr(holder, "_wait_connected", suspended_once)
    lock.release()                       # the delete never reached the server
    again = other.lock(path, blocking=True, timeout=10)
    assert zk_raw.get_children(path) == [again.token[0].node]
    again.release()
    assert holder.lock(path, blocking=True, timeout=10)


def test_writes_while_server_down_raise_not_hang(zookeeper_server, make_store):
    store = make_store(timeout=1.5)
    node = store.create_node(Node(state=NodeState.READY))
    zookeeper_server.stop()
    try:
        node.comment = "x"
        with pytest.raises(StoreError):
            store.update_node(node)
    finally:
        zookeeper_server.start()


# -- the shared store contract (tests/store_contract.py, written by the SQLite engineer) -----------

try:
    from store_contract import StoreContract
except ImportError:   # not landed yet: the ZooKeeper-specific tests above still run
    StoreContract = None

if StoreContract is not None:
    class TestZooKeeperStoreContract(StoreContract):
        @pytest.fixture
        def store_factory(self, make_store):
            """New started stores (separate sessions) sharing one fresh chroot."""
            return make_store


def test_lock_released_during_a_cache_walk_is_not_left_locked_in_the_cache(store, monkeypatch):
    """A walk (after every reconnect) that lists a lock directory just before our release
    deletes the contender puts the name back into the cache after the release took it out;
    the contender's delete event must still take it out again, or the node looks locked for
    good: never assigned, never cleaned up, counted against its pool."""
    node = store.create_node(Node(state=NodeState.READY))
    assert store.list_nodes()                        # the cache is on
    lock = store.lock_node(node.id)
    wait_for(lambda: node.id in store.locked_node_ids(), what="lock seen in cache")
    real_children_many = store._children_many
    released = []

    def listing_then_release(paths):
        listed = real_children_many(paths)          # the walk has read the contender
        if not released:
            released.append(True)
            lock.release()                          # ... and we release before it applies
        return listed

    monkeypatch.setattr(store, "_children_many", listing_then_release)
    walked = threading.Event()
    store._events.put(("rewalk", walked))
    assert walked.wait(WAIT) and released
    store.sync_nodes()                              # the delete event is applied after it
    wait_for(lambda: node.id not in store.locked_node_ids(),
             what="the released lock out of the cache")
