"""Several daemons on one real ZooKeeper: the builder's key paths on the ZooKeeper store, and two
``nodepool-launcher`` processes plus one ``nodepool-builder`` process sharing the work."""
import os
import signal
import subprocess
import sys
import threading

import pytest

from fixtures.launcher import assert_no_loop_crash, stop_processes, wait_until, zookeeper_yaml
from integration import test_builder as builder_tests
from integration.test_builder import (  # noqa: F401  (collected again, here on ZooKeeper)
    test_manual_build_request_is_cleared_when_the_build_is_ready,
    test_retention_after_three_builds_keeps_the_two_newest_per_provider,
    test_scheduled_build_uploads_to_two_providers)
from nodepool.client import NodepoolClient
from nodepool.config import load_config
from nodepool.model import NodeState, RequestState
from nodepool.store import open_store

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ZooKeeperBuilderEnv(builder_tests.Env):
    """The builder tests' world, with the state in ZooKeeper instead of the SQLite file."""

    def __init__(self, tmp_path, store_yaml):
        super().__init__(tmp_path)
        self.store_yaml = store_yaml

    def write_config(self, **kw):
        super().write_config(**kw)
        text = self.config_path.read_text()
        st = os.stat(self.config_path)
        self.config_path.write_text(self.store_yaml + text)
        os.utime(self.config_path, ns=(st.st_atime_ns, st.st_mtime_ns))

    def open_store(self):
        if self.store is None:
            self.store = open_store(load_config(str(self.config_path)))
            self.store.start()
        return self.store


@pytest.fixture
def env(tmp_path, zookeeper_server, zk_chroot, caplog):
    """Overrides the builder tests' ``env`` for the tests imported above."""
    world = ZooKeeperBuilderEnv(tmp_path, zookeeper_yaml(zookeeper_server, zk_chroot))
    world.write_config()
    yield world
    world.close()
    assert_no_loop_crash(caplog)


# -- two launchers and a builder as processes --------------------------------------------------------

CLUSTER_CONFIG = """\
images-dir: {tmp}/images
build-log-dir: {tmp}/logs
elements-dir: {tmp}/elements
labels:
  - name: img-node
diskimages:
  - name: img
    elements: [base]
    release: jammy
    dib-cmd: "{image_create}"
providers:
{providers}
"""

PROVIDER = """\
  - name: {name}
    driver: simulated
    boot-time: {boot_time}
    state-file: {tmp}/{name}.cloud
    diskimages:
      - name: img
    pools:
      - name: main
        max-servers: 10
        labels:
          - name: img-node
            diskimage: img
"""


class Cluster:
    """Daemon processes on one config; stops exactly the processes it started."""

    def __init__(self, tmp_path, store_yaml):
        self.tmp = tmp_path
        self.config_path = str(tmp_path / "nodepool.yaml")
        self.store_yaml = store_yaml
        self.procs = []
        self.stores = []
        (tmp_path / "elements" / "base").mkdir(parents=True)

    def write(self, boot_time):
        providers = "".join(PROVIDER.format(name=n, boot_time=boot_time, tmp=self.tmp)
                            for n in ("sim-a", "sim-b"))
        body = CLUSTER_CONFIG.format(tmp=self.tmp, providers=providers,
                                     image_create=f"{sys.executable} -m "
                                                  f"nodepool.builder.image_create")
        with open(self.config_path, "w") as f:
            f.write(self.store_yaml + body)

    def spawn(self, daemon, name):
        log = open(self.tmp / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", f"nodepool.cli.{daemon}", "-f", "-c",
                                 self.config_path] + (["--no-webapp"] if daemon == "launcher"
                                                      else []),
                                stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONPATH=REPO))
        proc.log = log
        proc.name = name
        self.procs.append(proc)
        return proc

    def store(self):
        store = open_store(load_config(self.config_path))
        store.start()
        self.stores.append(store)
        return store

    def close(self):
        stop_processes(self.procs, 30)
        for store in self.stores:
            store.stop()


@pytest.fixture
def cluster(tmp_path, zookeeper_server, zk_chroot):
    c = Cluster(tmp_path, zookeeper_yaml(zookeeper_server, zk_chroot))
    yield c
    c.close()


def cloud_instances(cluster):
    from nodepool.drivers.simulated.cloud import SimulatedCloud
    out = {}
    for prov in ("sim-a", "sim-b"):
        for inst in SimulatedCloud(cluster.tmp / f"{prov}.cloud").list_instances():
            if inst.status != "DELETING":
                out[inst.id] = prov
    return out


def test_two_launchers_and_a_builder_share_one_zookeeper(cluster):
    cluster.write(boot_time=0.2)
    cluster.spawn("builder", "builder")
    first = cluster.spawn("launcher", "launcher-1")
    cluster.spawn("launcher", "launcher-2")
    store = cluster.store()

    # the image is built once and uploaded once to each provider
    wait_until(lambda: sorted(u.provider for u in store.list_uploads("img")
                              if str(u.state) == "ready") == ["sim-a", "sim-b"],
               timeout=120, message="image built and uploaded to both providers")
    [build] = store.list_builds("img")
    assert str(build.state) == "ready"
    uploads = {u.provider: u for u in store.list_uploads("img")}
    wait_until(lambda: len(store.list_components("pool")) == 4, timeout=60,
               message="two launchers with two pools each registered")
    assert len(store.list_components("launcher")) == 2
    assert len(store.list_components("builder")) == 1

    # launchers reread uploads on a short timer: probe until both launchers see the image
    probe = NodepoolClient(cluster.store(), requestor="probe")

    def image_usable():
        reqs = [probe.submit(["img-node"]) for _ in range(4)]
        done = [probe.wait(r.id, timeout=60) for r in reqs]
        for r in done:
            if r.state == RequestState.FULFILLED:
                probe.release(probe.accept(r))
        return all(r.state == RequestState.FULFILLED for r in done)

    wait_until(image_usable, timeout=60, message="launchers see the uploaded image")
    wait_until(lambda: not store.list_nodes(), timeout=60, message="probe nodes deleted")

    # several clients, each with its own session, submit at once
    results, errors = {}, []

    def client_run(name, count):
        s = cluster.store()
        c = NodepoolClient(s, requestor=name)
        try:
            reqs = [c.submit(["img-node"]) for _ in range(count)]
            results[name] = [c.wait(r.id, timeout=120) for r in reqs]
        except Exception as exc:      # reported by the assertion below
            errors.append(f"{name}: {exc}")

    threads = [threading.Thread(target=client_run, args=(f"client-{i}", 3)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors
    done = [r for reqs in results.values() for r in reqs]
    assert len(done) == 12 and all(r.state == RequestState.FULFILLED for r in done)
    node_ids = [nid for r in done for nid in r.nodes]
    assert len(node_ids) == len(set(node_ids)) == 12          # no node allocated twice
    for r in done:
        [nid] = r.nodes
        node = store.get_node(nid)      # a direct read: the listing cache may trail by an event
        assert node.allocated_to == r.id and node.state == NodeState.READY
        assert node.image_id == uploads[node.provider].path

    # give everything back, then kill one launcher while requests are mid-launch
    client = NodepoolClient(cluster.store(), requestor="after-kill")
    for r in done:
        client.release(client.accept(r))
    cluster.write(boot_time=3)          # launches now take seconds: kill lands mid-launch
    reqs = [client.submit(["img-node"]) for _ in range(4)]
    wait_until(lambda: any(n.state in (NodeState.BUILDING, NodeState.INIT)
                           for n in store.list_nodes()), timeout=60,
               message="launches in flight")
    first.send_signal(signal.SIGKILL)
    first.wait()
    finished = [client.wait(r.id, timeout=120) for r in reqs]
    assert all(r.state == RequestState.FULFILLED for r in finished)
    new_ids = [nid for r in finished for nid in r.nodes]
    assert len(new_ids) == len(set(new_ids)) == 4
    wait_until(lambda: len(store.list_components("launcher")) == 1, timeout=60,
               message="the killed launcher's registration expired")
    for r in finished:
        client.release(client.accept(r))
    # nothing leaked: every instance left in the clouds is a node record, then none at all
    try:
        # a killed launcher's leaked instance is deleted after two leak scans (60 s apart)
        wait_until(lambda: not cloud_instances(cluster) and not store.list_nodes(), timeout=240,
                   message="all instances and node records cleaned up")
    except AssertionError:
        left = [(n.id, str(n.state), n.provider, n.external_id, store.is_node_locked(n.id))
                for n in store.list_nodes()]
        raise AssertionError(f"left behind: nodes {left}, instances "
                             f"{cloud_instances(cluster)}")
