"""End to end: the launcher with an OpenStack provider on the real local cloud.

Run on both state stores (``launcher_env`` is parametrized over SQLite and ZooKeeper).
"""
import signal
import time

import pytest

from fixtures.launcher import wait_until
from nodepool.model import NodeState

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("openstack")]


def write_config(env, provider, min_ready=0, max_servers=10, extra_provider="", floating=True,
                 min_ram=512):
    return env.write(f"""
        labels:
          - name: small
            min-ready: {min_ready}
        providers:
          - name: {provider}
            driver: openstack
            cloud: local
            rate: 0.001
            boot-timeout: 30
            launch-timeout: 120
            {extra_provider}
            cloud-images:
              - name: cirros
            pools:
              - name: main
                max-servers: {max_servers}
                networks: [private]
                auto-floating-ip: {str(floating).lower()}
                host-key-checking: false
                labels:
                  - name: small
                    cloud-image: cirros
                    min-ram: {min_ram}
        """)


def ready_unallocated(store):
    return [n for n in store.list_nodes()
            if n.state == NodeState.READY and not n.allocated_to]


def test_min_ready_request_and_delete_after_use(launcher_env, openstack_cloud,
                                                openstack_provider):
    write_config(launcher_env, openstack_provider, min_ready=1, min_ram=600)
    launcher_env.start_launcher()
    client = launcher_env.client()
    wait_until(lambda: ready_unallocated(client.store), timeout=120, message="min-ready node")
    node = ready_unallocated(client.store)[0]
    assert node.public_ipv4 and node.public_ipv4.startswith("172.24.4.")
    assert node.interface_ip == node.public_ipv4
    server = openstack_cloud.admin().compute.get_server(node.external_id)
    assert server.flavor["original_name"] == "m1.small"      # min-ram 600 -> 1024 MB flavor
    nodes = client.request(["small"], timeout=120)
    client.use(nodes)
    used_id = nodes[0].external_id
    client.release(nodes)
    wait_until(lambda: used_id not in {s.id for s in openstack_cloud.servers_of(
        openstack_provider)}, timeout=120, message="used server deleted")


def test_quota_pauses_then_fulfils(launcher_env, openstack_cloud, openstack_provider):
    conn = openstack_cloud.admin()
    project = conn.current_project_id
    before = conn.compute.get_quota_set(project).instances
    busy = len(list(conn.compute.servers()))
    conn.compute.update_quota_set(project, instances=busy + 2)
    try:
        write_config(launcher_env, openstack_provider, floating=False)
        launcher_env.start_launcher()
        client = launcher_env.client()
        first = [client.submit(["small"]) for _ in range(2)]
        held = [client.accept(client.wait(r.id, timeout=120)) for r in first]
        third = client.submit(["small"])
        time.sleep(5)
        assert client.store.get_request(third.id).state != "failed"
        assert str(client.store.get_request(third.id).state) in ("requested", "pending")
        client.release(held[0])
        done = client.wait(third.id, timeout=180)
        assert str(done.state) == "fulfilled"
        client.release(client.accept(done))
        client.release(held[1])
    finally:
        conn.compute.update_quota_set(project, instances=before)


def test_leaks_cleaned_after_sigkill(launcher_env, openstack_cloud, openstack_provider):
    write_config(launcher_env, openstack_provider, min_ready=2,
                 extra_provider="clean-floating-ips: true\n            port-cleanup-interval: 1")
    proc = launcher_env.spawn_launcher()
    wait_until(lambda: openstack_cloud.servers_of(openstack_provider), timeout=120,
               interval=0.2, message="a server being launched")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    leaked = {s.id for s in openstack_cloud.servers_of(openstack_provider)}
    assert leaked
    # the killed launcher's node records are gone too, so its servers are pure leaks that only
    # the tag-based leak scan can find
    store = launcher_env.store()
    for node in store.list_nodes():
        store.delete_node(node.id)
    write_config(launcher_env, openstack_provider, min_ready=0,
                 extra_provider="clean-floating-ips: true\n            port-cleanup-interval: 1")
    launcher_env.start_launcher()
    conn = openstack_cloud.admin()
    wait_until(lambda: not leaked & {s.id for s in openstack_cloud.servers_of(
        openstack_provider)}, timeout=120, interval=0.5, message="leaked servers deleted")
    wait_until(lambda: not [f for f in conn.network.ips() if not f.port_id], timeout=60,
               interval=0.5, message="unattached floating IPs deleted")
    wait_until(lambda: not [p for p in conn.network.ports(status="DOWN")
                            if (p.device_owner or "").startswith("compute:")],
               timeout=60, interval=0.5, message="DOWN ports deleted")
