"""The launcher end to end: real SQLite store file, real simulated cloud state file.

Launchers run in a thread of the test process here (each with its own store session, exactly
as separate processes would); tests/integration/test_launcher_processes.py runs them as
processes for the restart and crash paths.
"""
import time

import pytest

from fixtures.launcher import wait_until
from nodepool.client import RequestFailed
from nodepool.drivers.base import LaunchSpec, META_NODE_ID, META_POOL, META_PROVIDER
from nodepool.errors import StoreError
from nodepool.model import Node, NodeState, RequestState

BASIC = """\
labels:
  - name: small
    min-ready: {min_ready}
    max-ready-age: {max_ready_age}
  - name: big
providers:
  - name: sim
    driver: simulated
    boot-time: {boot_time}
    delete-time: {delete_time}
    boot-failure-rate: {boot_failure_rate}
    launch-retries: {retries}
    quota: {quota}
    cloud-images:
      - name: img
    pools:
      - name: main
        max-servers: {max_servers}
        labels:
          - name: small
            cloud-image: img
            cores: 1
            ram: 1024
          - name: big
            cloud-image: img
            cores: 8
            ram: 8192
"""


def basic(env, min_ready=0, max_ready_age=0, boot_time=0.05, boot_failure_rate=0.0,
          retries=3, quota="{}", max_servers=10, delete_time=0.0):
    return env.write(BASIC.format(min_ready=min_ready, max_ready_age=max_ready_age,
                                  boot_time=boot_time, delete_time=delete_time,
                                  boot_failure_rate=boot_failure_rate,
                                  retries=retries, quota=quota, max_servers=max_servers))


def ready_unallocated(store, label="small"):
    return [n for n in store.list_nodes()
            if n.state == NodeState.READY and not n.allocated_to and label in n.type]


def cloud_instances(env, provider="sim"):
    return [i for i in env.adapter(provider).list_instances() if not i.deleted]


def test_min_ready_nodes_become_ready(launcher_env):
    basic(launcher_env, min_ready=2)
    launcher_env.start_launcher()
    store = launcher_env.store()
    nodes = wait_until(lambda: len(ready_unallocated(store)) >= 2 and ready_unallocated(store),
                       message="two ready small nodes")
    for node in nodes:
        assert node.provider == "sim" and node.pool == "main"
        assert node.external_id and node.interface_ip and node.host_keys
        assert node.launcher and node.resources["cores"] == 1
    # never more than min-ready waiting
    assert len(ready_unallocated(store)) == 2
    # the stock requests end with their nodes: deleted, and the nodes' locks let go
    wait_until(lambda: not store.list_requests(), message="min-ready requests finished")
    wait_until(lambda: not any(store.is_node_locked(n.id) for n in nodes),
               message="stock nodes unlocked")
    instances = cloud_instances(launcher_env)
    assert {i.external_id for i in instances} == {n.external_id for n in nodes}
    assert all(i.metadata[META_PROVIDER] == "sim" and i.metadata[META_POOL] == "main"
               for i in instances)


def test_request_served_from_ready_node_then_used_node_deleted(launcher_env):
    basic(launcher_env, min_ready=1)
    launcher_env.start_launcher()
    client = launcher_env.client()
    wait_until(lambda: ready_unallocated(client.store), message="a ready node")
    ready_id = ready_unallocated(client.store)[0].id
    nodes = client.request(["small"], timeout=20)
    assert [n.id for n in nodes] == [ready_id]
    assert nodes[0].allocated_to is not None
    assert client.store.is_node_locked(ready_id)
    client.use(nodes, user_data={"job": "x"})
    assert client.store.get_node(ready_id).state == NodeState.IN_USE
    client.release(nodes)
    wait_until(lambda: client.store.get_node(ready_id) is None, message="used node deleted")
    wait_until(lambda: ready_unallocated(client.store), message="min-ready refilled")
    assert nodes[0].external_id not in {i.external_id for i in cloud_instances(launcher_env)}


def test_request_launches_new_nodes_in_label_order(launcher_env):
    basic(launcher_env)
    launcher_env.start_launcher()
    client = launcher_env.client()
    nodes = client.request(["big", "small", "big"], timeout=20)
    assert [n.type for n in nodes] == [["big"], ["small"], ["big"]]
    assert all(n.state == NodeState.READY for n in nodes)
    client.release(nodes)


def test_unknown_label_request_fails_with_reason(launcher_env):
    basic(launcher_env)
    launcher_env.start_launcher()
    client = launcher_env.client()
    req = client.submit(["no-such-label"])
    req = client.wait(req.id, timeout=20)
    assert req.state == RequestState.FAILED
    with pytest.raises(RequestFailed, match="not available: no-such-label"):
        client.accept(req)
    assert client.store.get_request(req.id) is None


def test_pool_limit_pauses_then_serves_when_nodes_free(launcher_env):
    basic(launcher_env, max_servers=1)
    launcher = launcher_env.start_launcher()
    client = launcher_env.client()
    first = client.request(["small"], timeout=20)
    waiting = client.submit(["small"])
    wait_until(lambda: launcher.paused_pools == {"sim/main"}, message="pool paused")
    comp = [c for c in client.store.list_components("pool")][0]
    assert comp.paused
    assert client.store.get_request(waiting.id).state == RequestState.REQUESTED
    client.release(first)
    req = client.wait(waiting.id, timeout=20)
    assert req.state == RequestState.FULFILLED


def test_cloud_quota_pauses_instead_of_failing(launcher_env):
    basic(launcher_env, quota="{instances: 2}")
    launcher_env.start_launcher()
    client = launcher_env.client()
    held = client.request(["small", "small"], timeout=20)
    waiting = client.submit(["small"])
    wait_until(lambda: client.store.get_request(waiting.id).state == RequestState.REQUESTED
               and client.store.get_request(waiting.id).declined_by == [], timeout=2,
               message="request kept")
    client.release(held)
    assert client.wait(waiting.id, timeout=20).state == RequestState.FULFILLED


def test_request_bigger_than_pool_is_declined(launcher_env):
    basic(launcher_env, max_servers=2)
    launcher_env.start_launcher()
    client = launcher_env.client()
    req = client.wait(client.submit(["small"] * 3).id, timeout=20)
    assert req.state == RequestState.FAILED
    assert "exceed" in " ".join(req.extra["declined_reasons"].values())


def test_failed_boots_are_retried_then_request_fails_and_nothing_leaks(launcher_env):
    basic(launcher_env, boot_failure_rate=1.0, retries=2)
    launcher_env.start_launcher()
    client = launcher_env.client()
    req = client.wait(client.submit(["small"]).id, timeout=30)
    assert req.state == RequestState.FAILED
    assert "after 2 attempt(s)" in " ".join(req.extra["declined_reasons"].values())
    wait_until(lambda: not client.store.list_nodes(), message="failed node deleted")
    wait_until(lambda: not cloud_instances(launcher_env), message="no instance left in cloud")


def test_max_ready_age_replaces_old_ready_nodes(launcher_env):
    basic(launcher_env, min_ready=1, max_ready_age=1)
    launcher_env.start_launcher()
    store = launcher_env.store()
    first = wait_until(lambda: ready_unallocated(store), message="ready node")[0].id
    wait_until(lambda: store.get_node(first) is None, timeout=20, message="old node deleted")
    wait_until(lambda: ready_unallocated(store), message="replacement ready")


def test_held_node_kept_until_its_expiration(launcher_env):
    basic(launcher_env)
    launcher_env.start_launcher()
    client = launcher_env.client()
    nodes = client.request(["small"], timeout=20)
    client.release(nodes, hold=True, comment="debugging", hold_expiration=1)
    node = client.store.get_node(nodes[0].id)
    assert node.state == NodeState.HOLD and node.comment == "debugging"
    wait_until(lambda: client.store.get_node(nodes[0].id) is None, timeout=20,
               message="hold expired and node deleted")


def test_unlocked_in_use_node_of_dead_client_is_deleted(launcher_env):
    basic(launcher_env)
    launcher_env.start_launcher()
    client = launcher_env.client()
    nodes = client.request(["small"], timeout=20)
    client.use(nodes)
    client.store.stop()    # the client's session ends: its locks go
    store = launcher_env.store()
    wait_until(lambda: store.get_node(nodes[0].id) is None, message="orphan in-use node deleted")


def test_requestor_gone_before_fulfilment_returns_nodes_to_pool(launcher_env):
    basic(launcher_env, boot_time=0.5)
    launcher_env.start_launcher()
    client = launcher_env.client()
    req = client.submit(["small"])
    wait_until(lambda: any(n.allocated_to == req.id for n in client.store.list_nodes()),
               message="launch started")
    client.store.stop()    # ephemeral request vanishes with the session
    store = launcher_env.store()
    node = wait_until(lambda: ready_unallocated(store), timeout=20,
                      message="node back in the pool")[0]
    assert node.allocated_to is None


def test_leaked_instance_is_deleted(launcher_env):
    basic(launcher_env)
    adapter = launcher_env.adapter("sim")
    cfg = launcher_env.config
    pool = cfg.providers["sim"].pools["main"]
    sm = adapter.create_state_machine(LaunchSpec(
        hostname="np9999999999", label=pool.labels["small"], pool=pool,
        metadata={META_NODE_ID: "9999999999", META_POOL: "main", META_PROVIDER: "sim"}))
    wait_until(lambda: sm.advance() is not None or sm.external_id, message="instance created")
    foreign = adapter.create_state_machine(LaunchSpec(
        hostname="other", label=pool.labels["small"], pool=pool,
        metadata={META_NODE_ID: "1", META_PROVIDER: "some-other-provider"}))
    wait_until(lambda: foreign.advance() is not None or foreign.external_id,
               message="foreign instance created")
    launcher_env.start_launcher()
    wait_until(lambda: sm.external_id not in {i.external_id for i in cloud_instances(launcher_env)},
               message="leaked instance deleted")
    assert foreign.external_id in {i.external_id for i in cloud_instances(launcher_env)}


def test_delete_whose_record_removal_failed_is_finished_later(launcher_env):
    """The instance is gone and the record says ``deleted``, but removing the record failed
    (a store error, or a crash between the two writes): a later cleanup pass removes it."""
    basic(launcher_env)
    launcher = launcher_env.start_launcher()
    real_delete = launcher.store.delete_node
    failures = []

    def delete_once_failing(node_id):
        if not failures:
            failures.append(node_id)
            raise StoreError("injected: connection lost during delete")
        return real_delete(node_id)

    launcher.store.delete_node = delete_once_failing
    client = launcher_env.client()
    nodes = client.request(["small"], timeout=20)
    client.release(nodes)
    node_id = nodes[0].id
    wait_until(lambda: failures, message="the first record removal failed")
    wait_until(lambda: client.store.get_node(node_id) is None, timeout=20,
               message="record left in deleted state removed")
    assert failures == [node_id]
    assert not cloud_instances(launcher_env)


def test_ready_nodes_assigned_to_a_retried_accept_go_back_to_the_pool(launcher_env,
                                                                     monkeypatch):
    """Accepting assigns ready nodes first; when the launch half then finds the pool filled
    meanwhile (another launcher), the accept is retried later and the assigned ready node must
    be free again, not left allocated to a request that is still waiting."""
    from nodepool.launcher import planner
    basic(launcher_env, min_ready=1)
    launcher_env.start_launcher()
    store = launcher_env.store()
    [ready] = wait_until(lambda: ready_unallocated(store), message="one ready node")
    real_take, refused = planner.Room.take, []

    def filled_meanwhile_once(room, labels):
        if not refused:
            refused.append(list(labels))
            return False
        return real_take(room, labels)

    monkeypatch.setattr(planner.Room, "take", filled_meanwhile_once)
    client = launcher_env.client()
    req = client.submit(["small", "small"])
    done = client.wait(req.id, timeout=20)
    assert refused == [["small"]]                   # the first accept was retried
    assert done.state == RequestState.FULFILLED and ready.id in done.nodes
    client.release(client.accept(done))


def test_lost_pending_request_is_requeued_and_served(launcher_env):
    basic(launcher_env)
    store = launcher_env.store()
    other = launcher_env.store()      # a "launcher" that takes a request and dies
    from nodepool.model import NodeRequest
    req = store.submit_request(NodeRequest(node_types=["small"], requestor="t"),
                               ephemeral=False)
    lock = other.lock_request(req.id)
    taken = other.get_request(req.id)
    taken.set_state(RequestState.PENDING)
    other.update_request(taken)
    half = other.create_node(Node(state=NodeState.BUILDING, provider="sim", pool="main",
                                  type=["small"], allocated_to=req.id))
    other.stop()                      # dies: its locks go
    assert lock is not None
    launcher_env.start_launcher()
    client = launcher_env.client()
    done = client.wait(req.id, timeout=20)
    assert done.state == RequestState.FULFILLED
    wait_until(lambda: store.get_node(half.id) is None, message="abandoned node removed")


def test_config_reload_applies_new_limits_without_dropping_work(launcher_env):
    basic(launcher_env, max_servers=1)
    launcher = launcher_env.start_launcher()
    client = launcher_env.client()
    first = client.request(["small"], timeout=20)
    waiting = client.submit(["small"])
    wait_until(lambda: launcher.paused_pools, message="pool paused at max-servers 1")
    basic(launcher_env, max_servers=5)
    assert client.wait(waiting.id, timeout=20).state == RequestState.FULFILLED
    client.release(first)


def test_bad_config_reload_keeps_running_config(launcher_env):
    basic(launcher_env, min_ready=1)
    launcher = launcher_env.start_launcher()
    client = launcher_env.client()
    wait_until(lambda: ready_unallocated(client.store), message="ready node")
    with open(launcher_env.config_path, "a") as f:
        f.write("bogus-key: 1\n")
    import os
    st = os.stat(launcher_env.config_path)
    os.utime(launcher_env.config_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    nodes = client.request(["small"], timeout=20)
    assert nodes and launcher.config.labels["small"].min_ready == 1
    client.release(nodes)


def test_launch_timeout_fails_attempts_and_cleans_up(launcher_env):
    launcher_env.write("""\
labels:
  - name: slow
providers:
  - name: sim
    driver: simulated
    boot-time: 30
    launch-timeout: 0.3
    launch-retries: 2
    cloud-images:
      - name: img
    pools:
      - name: main
        labels:
          - name: slow
            cloud-image: img
""")
    launcher_env.start_launcher()
    client = launcher_env.client()
    req = client.wait(client.submit(["slow"]).id, timeout=30)
    assert req.state == RequestState.FAILED
    reasons = " ".join(req.extra["declined_reasons"].values())
    assert "launch-timeout" in reasons and "after 2 attempt(s)" in reasons
    wait_until(lambda: not cloud_instances(launcher_env), message="timed-out instances deleted")


def test_api_errors_are_retried_per_node_and_daemon_keeps_serving(launcher_env):
    launcher_env.write("""\
labels:
  - name: small
providers:
  - name: flaky
    driver: simulated
    boot-time: 0.05
    api-error-rate: 0.3
    seed: 7
    launch-retries: 5
    cloud-images:
      - name: img
    pools:
      - name: main
        labels:
          - name: small
            cloud-image: img
""")
    launcher = launcher_env.start_launcher()
    client = launcher_env.client()
    reqs = [client.submit(["small"]) for _ in range(5)]
    done = [client.wait(r.id, timeout=60) for r in reqs]
    assert all(r.state in (RequestState.FULFILLED, RequestState.FAILED) for r in done)
    assert sum(r.state == RequestState.FULFILLED for r in done) >= 3
    assert launcher.thread.is_alive()
    for r in done:
        if r.state == RequestState.FULFILLED:
            client.release(client.accept(r))


DISKIMAGE = """\
labels:
  - name: jammy
diskimages:
  - name: ubuntu-jammy
    elements: [base]
providers:
  - name: sim
    driver: simulated
    boot-time: 0.05
    diskimages:
      - name: ubuntu-jammy
    pools:
      - name: main
        labels:
          - name: jammy
            diskimage: ubuntu-jammy
"""


def test_diskimage_label_boots_from_newest_ready_upload_and_reverts(launcher_env):
    """Nodes boot from the newest ready upload; deleting it makes the previous one current."""
    from nodepool.drivers.base import ImageUploadSpec
    from nodepool.model import ImageBuild, ImageUpload
    launcher_env.write(DISKIMAGE)
    adapter = launcher_env.adapter("sim")
    image_file = launcher_env.dir / "img.qcow2"
    image_file.write_bytes(b"QFI\xfb" + b"\0" * 4096)
    store = launcher_env.store()
    uploads = []
    for n in range(2):
        build = store.create_build(ImageBuild(image="ubuntu-jammy", state="ready",
                                              formats="qcow2", state_time=1000.0 + n))
        ext = adapter.upload_image(ImageUploadSpec(
            image_name=f"ubuntu-jammy-{n}", filename=str(image_file), image_format="qcow2",
            metadata={}))
        uploads.append(store.create_upload(ImageUpload(
            image="ubuntu-jammy", build_id=build.id, provider="sim", state="ready",
            external_id=ext, external_name=f"ubuntu-jammy-{n}", format="qcow2",
            state_time=1000.0 + n)))
    launcher_env.start_launcher()
    client = launcher_env.client()
    first = client.request(["jammy"], timeout=20)[0]
    assert first.image_id == uploads[1].path
    assert adapter.cloud.get_instance(first.external_id).image_id == uploads[1].external_id
    # the operator reverts the bad newest image: new nodes use the previous one at once
    bad = store.get_upload("ubuntu-jammy", uploads[1].build_id, "sim", uploads[1].id)
    bad.set_state("deleting")
    store.update_upload(bad)
    second = client.request(["jammy"], timeout=20)[0]
    assert second.image_id == uploads[0].path
    assert adapter.cloud.get_instance(second.external_id).image_id == uploads[0].external_id
    client.release([first, second])


def test_cloud_quota_refusal_aborts_and_relaunches_when_room_appears(launcher_env):
    """With ignore-provider-quota the launcher launches anyway; the cloud's quota refusal aborts
    the node (not a failure) and the slot is relaunched once capacity frees."""
    launcher_env.write(BASIC.format(min_ready=0, max_ready_age=0, boot_time=0.05,
                                    delete_time=0.0, boot_failure_rate=0.0, retries=3, quota="{instances: 1}",
                                    max_servers=10).replace(
        "        max-servers: 10\n", "        max-servers: 10\n        ignore-provider-quota: true\n"))
    launcher_env.start_launcher()
    client = launcher_env.client()
    held = client.request(["small"], timeout=20)
    waiting = client.submit(["small"])
    wait_until(lambda: client.store.get_request(waiting.id).state == RequestState.PENDING,
               message="second request accepted")
    # the cloud refuses (one instance is all it allows): the request waits, it does not fail
    time_limit = time.monotonic() + 1.0
    while time.monotonic() < time_limit:
        assert client.store.get_request(waiting.id).state == RequestState.PENDING
    client.release(held)
    done = client.wait(waiting.id, timeout=30)
    assert done.state == RequestState.FULFILLED
    client.release(client.accept(done))


@pytest.mark.parametrize("launcher_env", ["zookeeper"], indirect=True)
def test_lock_directories_of_finished_requests_are_collected(launcher_env, zk_raw):
    basic(launcher_env)
    launcher_env.start_launcher(lock_gc_interval=0.2, request_lock_max_age=0)
    client = launcher_env.client()
    nodes = client.request(["small"], timeout=20)     # deletes its request when fulfilled
    client.release(nodes)
    pending = client.submit(["big"], ephemeral=False)
    wait_until(lambda: client.store.get_request(pending.id).state == RequestState.FULFILLED,
               message="second request fulfilled")
    # the fulfilled request's directory goes once its request is gone; the live one's stays
    wait_until(lambda: zk_raw.get_children("/nodepool/requests-lock") == [pending.id],
               message="only the live request's lock directory left")


def test_provider_whose_cloud_cannot_be_loaded_does_not_stop_the_others(sqlite_launcher_env,
                                                                         tmp_path, monkeypatch):
    """One provider's clouds.yaml entry is missing: the launcher starts, the healthy provider
    serves, requests only the broken one could serve are declined with its start error."""
    empty = tmp_path / "clouds.yaml"
    empty.write_text("clouds: {}\n")
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(empty))
    env = sqlite_launcher_env
    env.write("""\
        labels:
          - name: small
          - name: os-small
        providers:
          - name: sim
            driver: simulated
            boot-time: 0.05
            cloud-images:
              - name: img
            pools:
              - name: main
                labels:
                  - name: small
                    cloud-image: img
          - name: gone
            driver: openstack
            cloud: no-such-cloud
            cloud-images:
              - name: cirros
            pools:
              - name: main
                labels:
                  - name: os-small
                    cloud-image: cirros
                    min-ram: 512
        """)
    launcher = env.start_launcher()
    client = env.client()
    nodes = client.request(["small"], timeout=20)
    assert [n.provider for n in nodes] == ["sim"]
    client.release(nodes)
    req = client.wait(client.submit(["os-small"]).id, timeout=20)
    assert req.state == RequestState.FAILED
    assert "no-such-cloud" in " ".join(req.extra["declined_reasons"].values())
    assert "no-such-cloud" in launcher.workers["gone"].start_error
