"""The metastatic driver end to end: a launcher (in this process) on the embedded SQLite store,
backing nodes from the simulated cloud and from a static host behind a real sshd."""
import time

import pytest

from fixtures.launcher import wait_until
from nodepool.client import RequestFailed
from nodepool.drivers.base import KEPT_BY
from nodepool.drivers.metastatic import adapter as meta_adapter
from nodepool.launcher import provider_worker
from nodepool.model import NodeState

pytestmark = pytest.mark.slow

REQUESTOR = "NodePool:metastatic:meta"

SIMULATED = """\
labels:
  - name: big
  - name: small
  - name: orphan
providers:
  - name: sim
    driver: simulated
    boot-time: 0.05
    cloud-images:
      - name: img
    pools:
      - name: main
        max-servers: 10
        labels:
          - name: big
            cloud-image: img
  - name: meta
    driver: metastatic
    launch-retries: 1
    pools:
      - name: main
        max-servers: 10
        host-key-checking: false
        node-attributes:
          kind: meta
        labels:
          - name: small
            backing-label: big
            max-parallel-jobs: 2
            grace-time: {grace}
          - name: orphan
            backing-label: nowhere
labels-extra: []
"""


@pytest.fixture
def env(sqlite_launcher_env, monkeypatch):
    monkeypatch.setattr(provider_worker, "PERIODIC_SECONDS", 0.1)
    monkeypatch.setattr(meta_adapter, "RECONCILE", 0.2)
    return sqlite_launcher_env


@pytest.fixture
def any_env(launcher_env, monkeypatch):
    """The same on each store: embedded SQLite and a real ZooKeeper."""
    monkeypatch.setattr(provider_worker, "PERIODIC_SECONDS", 0.1)
    monkeypatch.setattr(meta_adapter, "RECONCILE", 0.2)
    return launcher_env


def write(env, grace=0.5):
    text = SIMULATED.format(grace=grace).replace("labels-extra: []\n", "")
    text = text.replace("  - name: orphan\nproviders", "  - name: orphan\n  - name: nowhere\n"
                        "providers")
    return env.write(text)


def nodes_of(store, provider, state=None):
    return [n for n in store.list_nodes() if n.provider == provider
            and (state is None or n.state == state)]


def our_requests(store):
    return [r for r in store.list_requests() if r.requestor == REQUESTOR]


def test_slots_share_a_backing_node_which_is_returned_after_grace(any_env):
    env = any_env
    write(env)
    env.start_launcher()
    client = env.client()
    store = client.store
    first = client.request(["small", "small"], timeout=30)
    [backing] = nodes_of(store, "sim")
    assert backing.state == NodeState.IN_USE
    assert backing.user_data[KEPT_BY] == "meta" and backing.user_data["label"] == "big"
    assert sorted(n.external_id for n in first) == [f"{backing.id}-0", f"{backing.id}-1"]
    for node in first:
        assert node.provider == "meta" and node.type == ["small"]
        assert node.interface_ip == backing.interface_ip
        assert node.driver_data == {"backing_node": backing.id, "slot": node.slot}
        assert node.attributes == {"kind": "meta"}
    # a third slot needs a second backing node
    client.use(first)
    [third] = client.request(["small"], timeout=30)
    backings = nodes_of(store, "sim")
    assert len(backings) == 2
    assert third.external_id.rsplit("-", 1)[0] != backing.id
    assert our_requests(store) == []          # every backing request was ended
    # returned slots: once empty for the grace time, both backing nodes go back and are deleted
    client.release(first)
    client.release([third])
    wait_until(lambda: not nodes_of(store, "sim") and not nodes_of(store, "meta"),
               timeout=30, message="backing and metastatic nodes deleted")
    assert env.adapter("sim").list_instances() == []


def test_a_free_slot_is_used_before_a_new_backing_node(env):
    write(env, grace=30)
    env.start_launcher()
    client = env.client()
    store = client.store
    [one] = client.request(["small"], timeout=30)
    client.release([one])                    # its slot is freed; the backing node stays
    wait_until(lambda: not nodes_of(store, "meta"), message="slot freed")
    [two] = client.request(["small"], timeout=30)
    assert len(nodes_of(store, "sim")) == 1
    assert two.external_id.rsplit("-", 1)[0] == one.external_id.rsplit("-", 1)[0]


def test_backing_request_that_fails_is_ended_and_fails_the_launch(env):
    write(env)
    env.start_launcher()
    client = env.client()
    req = client.submit(["orphan"])
    done = client.wait(req.id, timeout=60)
    with pytest.raises(RequestFailed, match="nowhere"):
        client.accept(done)
    wait_until(lambda: not our_requests(client.store), message="backing requests ended")
    assert nodes_of(client.store, "sim") == []


def test_lost_backing_node_fails_its_free_nodes(env):
    write(env, grace=30)
    env.start_launcher()
    client = env.client()
    store = client.store
    [kept] = client.request(["small"], timeout=30)
    client.use([kept])
    # a ready metastatic node on the same backing node (min-ready style: allocated, released)
    [backing] = nodes_of(store, "sim")
    # the backing node disappears behind the driver's back
    store.delete_node(backing.id)
    wait_until(lambda: store.get_node(kept.id) is not None, message="in-use node kept")
    # the in-use node stays with its user; once returned it is deleted as usual
    time.sleep(1.0)
    assert store.get_node(kept.id).state == NodeState.IN_USE
    client.release([kept])
    wait_until(lambda: not nodes_of(store, "meta"), message="metastatic node deleted")
    # a new request gets a new backing node
    [again] = client.request(["small"], timeout=30)
    assert again.external_id.rsplit("-", 1)[0] != backing.id


def test_backing_node_survives_a_launcher_restart_and_is_returned_after(env):
    write(env, grace=0.5)
    launcher = env.start_launcher()
    client = env.client()
    store = client.store
    [node] = client.request(["small"], timeout=30)
    client.use([node])
    [backing] = nodes_of(store, "sim")
    env.stop_launcher(launcher)
    launcher.shutdown()
    env.start_launcher()
    # re-adopted: still in use, locked by the new launcher, not deleted by its cleanup
    wait_until(lambda: store.is_node_locked(backing.id), message="backing node re-locked")
    time.sleep(1.0)
    assert store.get_node(backing.id).state == NodeState.IN_USE
    # its slot is known again: a second node shares the backing node
    [other] = client.request(["small"], timeout=30)
    assert other.external_id == f"{backing.id}-{1 - node.slot}"
    client.release([node, other])
    wait_until(lambda: not nodes_of(store, "sim"), timeout=30,
               message="backing node returned and deleted after the restart")
    assert our_requests(store) == []


STATIC = """\
labels:
  - name: host
  - name: job
providers:
  - name: lab
    driver: static
    pools:
      - name: hosts
        nodes:
          - name: 127.0.0.1
            connection-port: {port}
            labels: [host]
            timeout: 2
  - name: meta
    driver: metastatic
    pools:
      - name: main
        labels:
          - name: job
            backing-label: host
            max-parallel-jobs: 3
            grace-time: 0.5
"""


def test_static_host_as_backing_node(env, sshd_server, monkeypatch):
    from nodepool.drivers.static import adapter as static_adapter
    monkeypatch.setattr(static_adapter, "HOST_CHECK_INTERVAL", 0.3)
    monkeypatch.setattr(provider_worker, "RECONCILE_SECONDS", 0.1)
    env.write(STATIC.format(port=sshd_server.port))
    env.start_launcher()
    client = env.client()
    store = client.store
    jobs = client.request(["job", "job", "job"], timeout=60)
    [backing] = nodes_of(store, "lab")
    assert backing.state == NodeState.IN_USE
    for node in jobs:
        assert node.interface_ip == "127.0.0.1" and node.connection_port == sshd_server.port
        # host-key-checking (default on) scanned the host behind the backing node
        assert node.host_keys and set(node.host_keys) <= set(sshd_server.public_keys)
    client.release(jobs)
    # the static host is returned and goes back to ready for other users
    wait_until(lambda: [n for n in nodes_of(store, "lab", NodeState.READY)
                        if not n.allocated_to], timeout=30, message="static host back to ready")
    assert not nodes_of(store, "meta") or wait_until(lambda: not nodes_of(store, "meta"))


def test_free_node_on_a_lost_backing_node_fails_and_is_replaced(env):
    text = SIMULATED.format(grace=30).replace("labels-extra: []\n", "")
    text = text.replace("  - name: small\n  - name: orphan\nproviders",
                        "  - name: small\n    min-ready: 1\n  - name: orphan\n"
                        "  - name: nowhere\nproviders")
    env.write(text)
    env.start_launcher()
    store = env.store()

    def ready_meta():
        return [n for n in nodes_of(store, "meta", NodeState.READY) if not n.allocated_to]
    [first] = wait_until(ready_meta, timeout=30, message="a min-ready metastatic node")
    backing_id = first.driver_data["backing_node"]
    store.delete_node(backing_id)               # the backing node vanishes
    wait_until(lambda: store.get_node(first.id) is None, timeout=30,
               message="the lost node failed and deleted")
    [second] = wait_until(ready_meta, timeout=30, message="a replacement")
    assert second.driver_data["backing_node"] != backing_id


def test_config_change_hands_the_backing_node_to_the_new_adapter(env):
    write(env, grace=30)
    env.start_launcher()
    client = env.client()
    store = client.store
    [node] = client.request(["small"], timeout=30)
    [backing] = nodes_of(store, "sim")
    write(env, grace=0.5)                      # the metastatic provider is replaced
    time.sleep(2.0)
    assert store.get_node(backing.id).state == NodeState.IN_USE
    assert store.is_node_locked(backing.id)
    client.release([node])
    wait_until(lambda: not nodes_of(store, "sim"), timeout=30,
               message="backing node returned under the new grace time")


def test_killed_launcher_backing_node_is_readopted_not_leaked(env):
    write(env, grace=0.5)
    first = env.spawn_launcher()
    client = env.client()
    store = client.store
    [node] = client.request(["small"], timeout=60)
    client.use([node])
    [backing] = nodes_of(store, "sim")
    first.kill()                               # no shutdown: its session just expires
    first.wait()
    env.spawn_launcher()
    # the dead session's lock expires (session-timeout 3 s); the new launcher re-locks the
    # backing node instead of deleting it as an unlocked in-use node
    time.sleep(5.0)
    wait_until(lambda: store.is_node_locked(backing.id), timeout=20,
               message="backing node re-locked by the new launcher")
    assert store.get_node(backing.id).state == NodeState.IN_USE
    client.release([node])
    wait_until(lambda: not nodes_of(store, "sim"), timeout=60,
               message="backing node returned after the restart")
    assert our_requests(store) == []


# -- requests are ended: the adapter alone against the store (no launcher serves them) -----------

def adapter_and_spec(env, node_id="0000000042"):
    from nodepool.drivers.base import LaunchSpec
    from nodepool.drivers.metastatic.adapter import MetastaticAdapter
    write(env)
    store = env.store()
    prov = env.config.providers["meta"]
    adapter = MetastaticAdapter(prov)
    adapter.attach_store(store)
    adapter.start()
    pool = prov.pools["main"]

    def spec(nid=node_id):
        return LaunchSpec(hostname=f"np{nid}", label=pool.labels["small"], pool=pool,
                          metadata={}, node_id=nid)
    return store, adapter, spec


def test_parallel_launches_share_one_request_and_an_abandoned_one_is_ended(env):
    store, adapter, spec = adapter_and_spec(env)
    one, two, three = (adapter.create_state_machine(spec(n)) for n in ("1", "2", "3"))
    for machine in (one, two, three):
        assert machine.advance() is None
    requests = our_requests(store)
    assert len(requests) == 2                   # two slots per backing node: 1+2, then 3
    assert one.request_id == two.request_id != three.request_id
    # nobody polls any more (the launches were dropped): housekeeping ends the requests
    adapter.abandoned_after = 0
    adapter.periodic()
    assert our_requests(store) == []
    with pytest.raises(Exception, match="was ended"):
        one.advance()


def test_a_launch_error_ends_its_request_unless_another_launch_waits(env):
    store, adapter, spec = adapter_and_spec(env)
    one, two = adapter.create_state_machine(spec("1")), adapter.create_state_machine(spec("2"))
    one.advance()
    two.advance()
    store.delete_request(one.request_id)        # the request vanishes: both launches fail
    with pytest.raises(Exception, match="vanished"):
        one.advance()
    with pytest.raises(Exception, match="vanished"):
        two.advance()
    assert adapter.pending == {}
    # a lone waiter that gives up (any error of its own) ends the request
    three = adapter.create_state_machine(spec("3"))
    three.advance()
    adapter.leave_request(three.request_id, "3")
    assert our_requests(store) == []


def test_requests_left_by_an_earlier_run_are_ended(env):
    from nodepool.model.records import NodeRequest
    store, adapter, _ = adapter_and_spec(env)
    store.submit_request(NodeRequest(node_types=["big"], requestor=REQUESTOR), ephemeral=False)
    assert len(our_requests(store)) == 1
    adapter.periodic()
    assert our_requests(store) == []
    adapter.stop()


def test_removed_provider_lets_its_backing_nodes_go(env, monkeypatch):
    monkeypatch.setattr(meta_adapter, "HANDOVER_WAIT", 0.5)
    write(env, grace=30)
    env.start_launcher()
    client = env.client()
    store = client.store
    [node] = client.request(["small"], timeout=30)
    client.release([node])
    [backing] = nodes_of(store, "sim")
    # the metastatic provider leaves the config: nobody keeps the backing node any more
    text = SIMULATED.format(grace=30).replace("labels-extra: []\n", "")
    env.write(text[:text.index("  - name: meta\n")])
    wait_until(lambda: store.get_node(backing.id) is None, timeout=30,
               message="the backing node deleted by cleanup")
