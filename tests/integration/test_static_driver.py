"""The static driver against a real sshd: host checks, then the whole launcher.

The adapter tests need only sshd.  The launcher tests run a launcher in this process against a
real SQLite store file (``fixtures.launcher``) with host checks every fraction of a second.
"""
import importlib.util
import socket

import pytest
import voluptuous

from nodepool.client import RequestFailed
from nodepool.config.model import Pool, Provider
from nodepool.drivers.static import node_schema
from nodepool.drivers.static import adapter as static_adapter
from nodepool.drivers.static.adapter import StaticAdapter, check_host
from nodepool.launcher import provider_worker
from nodepool.model import NodeState, RequestState

pytestmark = pytest.mark.slow

WRONG_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJhZGtleWJhZGtleWJhZGtleWJhZGtleWJhZGtleQ"


def wait_until(cond, timeout=30, interval=0.05, message="condition"):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]       # nobody listens once the socket is closed


def static_provider(*hosts):
    schema = voluptuous.Schema(node_schema())
    pool = Pool(name="hosts", provider="static", options={"nodes": [schema(h) for h in hosts]})
    return Provider(name="static", driver="static", pools={"hosts": pool})


# -- host checks ----------------------------------------------------------------------------------

def test_check_reads_the_real_host_keys(sshd_server):
    result = check_host({"name": "127.0.0.1", "connection-port": sshd_server.port, "timeout": 5})
    assert result.answers and result.error is None
    assert result.host_keys == sshd_server.public_keys


def test_configured_host_key_is_verified(sshd_server):
    host = {"name": "127.0.0.1", "connection-port": sshd_server.port, "timeout": 5}
    good = check_host(dict(host, **{"host-key": sshd_server.public_keys[0] + " root@host"}))
    assert good.answers
    bad = check_host(dict(host, **{"host-key": WRONG_KEY}))
    assert not bad.answers
    assert "static host 127.0.0.1: host key mismatch" in bad.error


def test_closed_port_is_a_clear_error():
    port = closed_port()
    result = check_host({"name": "127.0.0.1", "connection-port": port, "timeout": 2})
    assert not result.answers
    assert f"static host 127.0.0.1: cannot connect to port {port}" in result.error


def test_hanging_and_dead_hosts_do_not_hold_up_an_answering_one(sshd_server):
    hang = socket.socket()             # accepts TCP but never speaks SSH
    hang.bind(("127.0.0.1", 0))
    hang.listen(8)
    try:
        adapter = StaticAdapter(static_provider(
            {"name": "127.0.0.1", "connection-port": hang.getsockname()[1], "labels": "a",
             "timeout": 20},
            {"name": "127.0.0.1", "connection-port": closed_port(), "labels": "a"},
            {"name": "127.0.0.1", "connection-port": sshd_server.port, "labels": "a"}))
        adapter.start()
        try:
            def good_slot():
                slots = adapter.registered_nodes()
                return slots if slots[2].answers else None
            slots = wait_until(good_slot, message="the sshd host to be checked")
            assert slots[0].answers is None        # still waiting on the hanging host
            assert slots[2].host_keys == sshd_server.public_keys
            slots = wait_until(lambda: [s for s in adapter.registered_nodes()
                                        if s.answers is False], message="closed port checked")
            assert "cannot connect" in slots[0].error
        finally:
            adapter.stop()
    finally:
        hang.close()                           # the pending keyscan gets a reset and exits


# -- the provider worker alone, over a real ZooKeeper store ----------------------------------------

@pytest.fixture
def zk_store(zookeeper_server, zk_chroot):
    from nodepool.store.zookeeper import ZooKeeperStore
    store = ZooKeeperStore(zookeeper_server.hosts, chroot=zk_chroot)
    store.start()
    yield store
    store.stop()


@pytest.fixture
def static_worker(zk_store, monkeypatch):
    """Start a ProviderWorker for a hand-built static provider (no config file, no launcher)."""
    from nodepool.drivers.static import DRIVER
    from nodepool.config.model import Config
    monkeypatch.setattr(static_adapter, "HOST_CHECK_INTERVAL", 0.3)
    monkeypatch.setattr(provider_worker, "RECONCILE_SECONDS", 0.1)
    workers = []

    def start(*hosts):
        prov = static_provider(*hosts)
        DRIVER.finalize(prov, Config())
        worker = provider_worker.ProviderWorker(prov, zk_store, "test-launcher", tick=0.02,
                                                leak_interval=0)
        worker.start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()
        worker.join(10)


def test_worker_registers_returns_and_takes_hosts_out(zk_store, static_worker, sshd_factory):
    server = sshd_factory()
    static_worker({"name": "127.0.0.1", "connection-port": server.port, "labels": "linux",
                   "max-parallel-jobs": 2, "timeout": 2},
                  {"name": "127.0.0.1", "connection-port": closed_port(), "labels": "linux"})
    nodes = wait_until(lambda: len(zk_store.list_nodes()) == 2 and zk_store.list_nodes(),
                       message="two slots of the answering host registered")
    assert all(n.state == NodeState.READY and n.connection_port == server.port for n in nodes)
    assert all(n.host_keys == server.public_keys and n.launcher == "static driver"
               for n in nodes)
    # a requestor used one: it comes back as ready, same record, fields cleared
    used = nodes[0]
    with zk_store.lock_node(used.id):
        used = zk_store.get_node(used.id)
        used.allocated_to, used.user_data = "100-0000000001", {"job": "x"}
        used.set_state(NodeState.IN_USE)
        used.set_state(NodeState.USED)
        zk_store.update_node(used)
    back = wait_until(lambda: (zk_store.get_node(used.id).state == NodeState.READY
                               and zk_store.get_node(used.id)), message="used node ready again")
    assert back.allocated_to is None and back.user_data is None
    # the host goes away: its free nodes are taken out; it comes back: registered again
    server.stop()
    wait_until(lambda: not zk_store.list_nodes(), message="nodes of the dead host removed")
    server.start()
    wait_until(lambda: len(zk_store.list_nodes()) == 2, message="host registered again")


# -- through the launcher -------------------------------------------------------------------------

@pytest.fixture
def static_env(request, tmp_path, monkeypatch):
    """A launcher environment whose static hosts are checked and reconciled quickly.

    The store does not matter to the static driver: the embedded SQLite store when it is
    available, else a real ZooKeeper."""
    from fixtures.launcher import LauncherEnv, zookeeper_yaml
    monkeypatch.setattr(static_adapter, "HOST_CHECK_INTERVAL", 0.3)
    monkeypatch.setattr(provider_worker, "RECONCILE_SECONDS", 0.1)
    store_yaml = None
    if importlib.util.find_spec("nodepool.store.sqlite") is None:
        store_yaml = zookeeper_yaml(request.getfixturevalue("zookeeper_server"),
                                    request.getfixturevalue("zk_chroot"))
    env = LauncherEnv(tmp_path, store_yaml)
    yield env
    env.close()


def host(port, labels="linux", **extra):
    lines = ["          - name: 127.0.0.1", f"            connection-port: {port}",
             f"            labels: {labels}", "            timeout: 2"]
    lines += [f"            {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def write_static(env, *hosts):
    return env.write("labels:\n  - name: linux\n  - name: windows\n"
                     "providers:\n  - name: static\n    driver: static\n    pools:\n"
                     "      - name: hosts\n        nodes:\n" + "".join(hosts))


def static_nodes(store, port=None, state=None):
    out = []
    for node in store.list_nodes():
        if node.provider != "static":
            continue
        if port is not None and node.connection_port != port:
            continue
        if state is not None and node.state != state:
            continue
        out.append(node)
    return out


def test_hosts_registered_with_real_keys_served_and_returned_after_use(static_env, sshd_server):
    write_static(static_env, host(sshd_server.port, **{"max-parallel-jobs": 2}))
    static_env.start_launcher()
    client = static_env.client()
    store = client.store
    nodes = wait_until(lambda: len(static_nodes(store, state=NodeState.READY)) == 2
                       and static_nodes(store), message="two slots registered")
    assert sorted(n.slot for n in nodes) == [0, 1]
    assert {n.external_id for n in nodes} == {f"127.0.0.1:{sshd_server.port}#0",
                                              f"127.0.0.1:{sshd_server.port}#1"}
    for node in nodes:
        assert node.host_keys == sshd_server.public_keys
        assert node.interface_ip == "127.0.0.1" and node.connection_port == sshd_server.port
        assert node.type == ["linux"] and node.pool == "hosts" and node.username == "zuul"
    ids = {n.id for n in nodes}

    got = client.request(["linux", "linux"], timeout=30)
    assert {n.id for n in got} == ids
    client.use(got, user_data={"job": "x"})
    third = client.submit(["linux"])           # no free slot: waits, is not declined
    client.release(got)
    again = wait_until(lambda: len(static_nodes(store, state=NodeState.READY)) >= 1
                       and static_nodes(store), message="nodes back to ready")
    assert {n.id for n in again} == ids           # the same records: never deleted
    req = client.wait(third.id, timeout=30)
    assert req.state == RequestState.FULFILLED and req.nodes[0] in ids
    (node,) = client.accept(req)
    client.release([node])
    wait_until(lambda: len(static_nodes(store, state=NodeState.READY)) == 2,
               message="all slots ready again")
    back = store.get_node(node.id)
    assert back.allocated_to is None and back.user_data is None


def test_label_without_a_host_is_declined(static_env, sshd_server):
    write_static(static_env, host(sshd_server.port))
    static_env.start_launcher()
    client = static_env.client()
    req = client.wait(client.submit(["windows"]).id, timeout=30)
    assert req.state == RequestState.FAILED


def test_request_for_more_nodes_than_slots_fails_instead_of_waiting(static_env, sshd_server):
    write_static(static_env, host(sshd_server.port, **{"max-parallel-jobs": 2}))
    static_env.start_launcher()
    client = static_env.client()
    with pytest.raises(RequestFailed, match="can never serve all these nodes"):
        client.request(["linux", "linux", "linux"], timeout=30)
    assert len(client.request(["linux", "linux"], timeout=30)) == 2


def test_host_that_stops_answering_is_taken_out_and_comes_back(static_env, sshd_factory):
    server = sshd_factory()
    write_static(static_env, host(server.port))
    static_env.start_launcher()
    store = static_env.store()
    (first,) = wait_until(lambda: static_nodes(store, state=NodeState.READY),
                          message="host registered")
    server.stop()
    wait_until(lambda: not static_nodes(store), message="dead host taken out of service")
    server.start()
    (again,) = wait_until(lambda: static_nodes(store, state=NodeState.READY),
                          message="host back in service")
    assert again.host_keys == server.public_keys


def test_wrong_host_key_not_registered_while_other_host_serves(static_env, sshd_server,
                                                                sshd_factory, caplog):
    other = sshd_factory()
    write_static(static_env, host(sshd_server.port),
                 host(other.port, **{"host-key": f'"{WRONG_KEY}"'}))
    with caplog.at_level("ERROR", logger="nodepool.drivers.static"):
        static_env.start_launcher()
        client = static_env.client()
        wait_until(lambda: any("host key mismatch" in r.getMessage() for r in caplog.records),
                   message="host key error logged")
    assert static_nodes(client.store, port=other.port) == []
    got = client.request(["linux"], timeout=30)
    assert got[0].connection_port == sshd_server.port
    client.release(got)
    assert static_nodes(client.store, port=other.port) == []


def test_unreachable_host_does_not_block_the_others(static_env, sshd_server):
    dead = closed_port()
    write_static(static_env, host(dead), host(sshd_server.port))
    static_env.start_launcher()
    client = static_env.client()
    got = client.request(["linux"], timeout=30)
    assert got[0].connection_port == sshd_server.port
    client.release(got)
    assert static_nodes(client.store, port=dead) == []


def test_deleted_node_is_registered_again(static_env, sshd_server):
    write_static(static_env, host(sshd_server.port))
    static_env.start_launcher()
    store = static_env.store()
    (node,) = wait_until(lambda: static_nodes(store, state=NodeState.READY),
                         message="host registered")
    with store.lock_node(node.id):
        fresh = store.get_node(node.id)
        fresh.set_state(NodeState.DELETING)          # what `nodepool delete` does
        store.update_node(fresh)
    (again,) = wait_until(lambda: [n for n in static_nodes(store, state=NodeState.READY)
                                   if n.id != node.id], message="slot registered again")
    assert again.external_id == node.external_id
    assert store.get_node(node.id) is None


def test_removed_host_is_forgotten_on_reload(static_env, sshd_server, sshd_factory):
    other = sshd_factory()
    write_static(static_env, host(sshd_server.port), host(other.port))
    static_env.start_launcher()
    store = static_env.store()
    wait_until(lambda: len(static_nodes(store, state=NodeState.READY)) == 2,
               message="both hosts registered")
    write_static(static_env, host(sshd_server.port))
    wait_until(lambda: not static_nodes(store, port=other.port), message="removed host forgotten")
    assert len(static_nodes(store, port=sshd_server.port)) == 1


def test_host_with_several_labels_serves_a_request_for_any_of_them(static_env, sshd_server):
    # issue 10 item 3: a ready node whose type has two labels was never free
    write_static(static_env, host(sshd_server.port, labels="[linux, windows]"))
    static_env.start_launcher()
    client = static_env.client()
    store = client.store
    (slot,) = wait_until(lambda: static_nodes(store, state=NodeState.READY),
                         message="the slot registered")
    assert sorted(slot.type) == ["linux", "windows"]
    (got,) = client.request(["windows"], timeout=30)
    assert got.id == slot.id
    waiting = client.submit(["linux"])     # the one slot is taken: this waits for it
    client.release([got])
    req = client.wait(waiting.id, timeout=30)
    assert req.state == RequestState.FULFILLED and req.nodes == [slot.id]
    client.release(client.accept(req))


def test_one_host_registered_twice_with_other_usernames(static_env, sshd_server):
    port = sshd_server.port
    write_static(static_env, host(port, labels="linux", username="alice"),
                 host(port, labels="windows", username="bob"))
    static_env.start_launcher()
    client = static_env.client()
    store = client.store
    nodes = wait_until(lambda: len(static_nodes(store, state=NodeState.READY)) == 2
                       and static_nodes(store), message="both registrations")
    assert {(n.external_id, n.username, tuple(n.type)) for n in nodes} == {
        (f"alice@127.0.0.1:{port}#0", "alice", ("linux",)),
        (f"bob@127.0.0.1:{port}#0", "bob", ("windows",))}
    [win] = client.request(["windows"], timeout=30)
    assert win.username == "bob" and win.host_keys == sshd_server.public_keys
    client.release([win])
