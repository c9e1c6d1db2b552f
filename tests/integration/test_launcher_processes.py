"""Launchers as separate processes (``nodepool-launcher -f``): crash, restart, sharing work."""
import signal

import pytest

from fixtures.launcher import wait_until
from nodepool.model import NodeState, RequestState

pytestmark = pytest.mark.slow

CONFIG = """\
launcher:
  # an instance the killed launcher created but never recorded is found by the leak scan
  leak-interval: 1
labels:
  - name: small
    min-ready: {min_ready}
providers:
  - name: sim
    driver: simulated
    boot-time: {boot_time}
    cloud-images:
      - name: img
    pools:
      - name: main
        max-servers: 20
        labels:
          - name: small
            cloud-image: img
"""


def live_instances(env):
    return {i.external_id: i for i in env.adapter("sim").list_instances() if not i.deleted}


def test_sigterm_stops_cleanly_and_unregisters(launcher_env):
    launcher_env.write(CONFIG.format(min_ready=1, boot_time=0.05))
    proc = launcher_env.spawn_launcher()
    store = launcher_env.store()
    wait_until(lambda: store.list_components("launcher"), message="launcher registered")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert store.list_components("launcher") == []
    assert store.list_components("pool") == []


def test_launcher_killed_mid_launch_then_restarted_loses_nothing_and_leaks_nothing(launcher_env):
    launcher_env.write(CONFIG.format(min_ready=0, boot_time=3))
    first = launcher_env.spawn_launcher()
    client = launcher_env.client()
    req = client.submit(["small", "small"])
    store = client.store
    wait_until(lambda: [n for n in store.list_nodes() if n.external_id], timeout=30,
               message="instances being created")
    first.send_signal(signal.SIGKILL)
    first.wait()
    launcher_env.spawn_launcher()
    done = client.wait(req.id, timeout=60)
    assert done.state == RequestState.FULFILLED
    nodes = client.accept(done)
    assert len(nodes) == 2
    # every instance in the cloud belongs to a node record once cleanup has run
    wait_until(lambda: set(live_instances(launcher_env)) ==
               {n.external_id for n in store.list_nodes()}, timeout=60,
               message="half-built instances of the killed launcher cleaned up")
    client.release(nodes)
    wait_until(lambda: not live_instances(launcher_env), timeout=60,
               message="used nodes deleted from the cloud")


def test_two_launcher_processes_share_requests_without_double_allocation(launcher_env):
    launcher_env.write(CONFIG.format(min_ready=0, boot_time=0.2))
    launcher_env.spawn_launcher()
    launcher_env.spawn_launcher()
    client = launcher_env.client()
    store = client.store
    wait_until(lambda: len(store.list_components("pool")) == 2, message="two pool workers")
    reqs = [client.submit(["small"]) for _ in range(10)]
    done = [client.wait(r.id, timeout=60) for r in reqs]
    assert all(r.state == RequestState.FULFILLED for r in done)
    node_ids = [nid for r in done for nid in r.nodes]
    assert len(set(node_ids)) == 10
    launchers = {store.get_node(nid).launcher for nid in node_ids}
    assert len(launchers) >= 1
    for r in done:
        client.release(client.accept(r))
    wait_until(lambda: not [n for n in store.list_nodes() if n.state != NodeState.DELETED],
               timeout=60, message="all nodes deleted")


def test_two_launchers_racing_never_exceed_max_servers(launcher_env):
    launcher_env.write(CONFIG.format(min_ready=0, boot_time=0.3).replace(
        "max-servers: 20", "max-servers: 3"))
    launcher_env.spawn_launcher()
    launcher_env.spawn_launcher()
    client = launcher_env.client()
    store = client.store
    wait_until(lambda: len(store.list_components("pool")) == 2, message="two pool workers")
    reqs = [client.submit(["small"]) for _ in range(9)]
    most = 0
    served = 0
    pending = list(reqs)
    deadline_checks = 0
    while pending and deadline_checks < 6000:
        deadline_checks += 1
        store.sync_nodes()
        live = [n for n in store.list_nodes() if n.state != NodeState.DELETED]
        most = max(most, len(live))
        for r in list(pending):
            got = store.get_request(r.id)
            if got.state == RequestState.FULFILLED:
                client.release(client.accept(got))
                pending.remove(r)
                served += 1
        import time
        time.sleep(0.01)
    assert served == 9
    assert most <= 3, f"{most} nodes existed at once in a pool with max-servers 3"
