"""statsd (to a real UDP listener), the warm/cold wait record and ``nodepool wait-times``,
with a launcher running against the simulated cloud."""
import io
import os
import json
import urllib.request

import pytest

from fixtures.launcher import wait_until
from nodepool import waits
from nodepool.cli.nodepool import main as cli_main
from nodepool.client import RequestFailed

pytestmark = pytest.mark.slow

CONFIG = """\
webapp:
  port: 0
  listen_address: 127.0.0.1
labels:
  - name: small
    min-ready: 1
  - name: big
  - name: doomed
providers:
  - name: sim
    driver: simulated
    boot-time: 0.3
    cloud-images:
      - name: img
    pools:
      - name: main
        max-servers: 10
        labels:
          - name: small
            cloud-image: img
          - name: big
            cloud-image: img
            cores: 4
  - name: bad
    driver: simulated
    boot-time: 0.05
    boot-failure-rate: 1.0
    launch-retries: 1
    cloud-images:
      - name: img
    pools:
      - name: p1
        max-servers: 3
        labels:
          - name: doomed
            cloud-image: img
"""


def fulfil_and_return(client, labels):
    nodes = client.request(labels, timeout=30)
    client.use(nodes)
    client.release(nodes)
    return nodes


def run_cli(env, *argv):
    out, err = io.StringIO(), io.StringIO()
    rc = cli_main(["-c", env.config_path, *argv], out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def running(launcher_env, statsd_listener):
    launcher_env.write(CONFIG)
    launcher = launcher_env.start_launcher(webapp=True)
    store = launcher_env.store()
    # the min-ready node of "small" is there before anything asks for it
    wait_until(lambda: any(n.state.value == "ready" and "small" in n.type and not n.allocated_to
                           for n in store.list_nodes()), message="a ready small node")
    return launcher_env, launcher, store, statsd_listener


def test_statsd_names_waits_and_cli(running):
    env, launcher, store, listener = running
    client = env.client(requestor="zuul.example:tenant")
    warm = fulfil_and_return(client, ["small"])        # the min-ready node: warm
    cold = fulfil_and_return(client, ["big"])          # launched for it: cold
    assert warm and cold
    with pytest.raises(RequestFailed):
        client.request(["doomed"], timeout=30)

    az = cold[0].az
    listener.wait_for(
        # launches: counter + timer, overall, per provider, provider+AZ, requestor
        "nodepool.launch.ready", "nodepool.launch.provider.sim.ready",
        f"nodepool.launch.provider.sim.{az}.ready",
        "nodepool.launch.requestor.NodePool_min-ready.ready",
        "nodepool.launch.requestor.zuul_example_tenant.ready",
        "nodepool.launch.error.status", "nodepool.launch.provider.bad.error.status",
        # node gauges of the elected launcher
        "nodepool.nodes.ready", "nodepool.nodes.in-use", "nodepool.nodes.deleting",
        "nodepool.label.small.nodes.ready", "nodepool.label.doomed.nodes.failed",
        "nodepool.provider.sim.nodes.ready", "nodepool.provider.sim.max_servers",
        "nodepool.provider.bad.max_servers",
        "nodepool.provider.sim.pool.main.addressable_requests",
        # the wait of each fulfilled request, warm or cold
        "nodepool.request_wait.label.small.warm", "nodepool.request_wait.label.big.cold",
        "nodepool.request_wait.provider.sim.label.small.warm")
    # the launcher's own min-ready requests are not anybody's wait
    assert "nodepool.request_wait.label.small.cold" not in listener.names()
    kinds = {(n, k) for n, _, k in listener.metrics()}
    assert ("nodepool.launch.ready", "c") in kinds and ("nodepool.launch.ready", "ms") in kinds
    assert ("nodepool.request_wait.label.big.cold", "ms") in kinds
    assert listener.last("nodepool.provider.sim.max_servers") == 10
    assert listener.last("nodepool.provider.bad.max_servers") == 3
    # a ready node of "small" is kept (min-ready), and every gauge reports every state
    wait_until(lambda: listener.last("nodepool.label.small.nodes.ready") >= 1)
    assert listener.last("nodepool.label.big.nodes.hold") == 0

    # the waits are in the store, readable by another process (the CLI opens its own session)
    wait_until(lambda: {(w.label, w.warm) for w in waits.read_waits(
        store.list_components("launcher"))} >= {("small", True), ("big", False)},
        timeout=15, message="waits flushed to the launcher record")
    rc, out, err = run_cli(env, "wait-times", "--json")
    assert rc == 0, err
    rows = {r["label"]: r for r in json.loads(out)}
    assert rows["small"]["warm"] >= 1 and rows["small"]["warm_ratio"] > 0
    assert rows["big"]["cold"] == 1 and rows["big"]["warm_ratio"] == 0
    assert rows["big"]["p50"] >= 0.3          # it waited for a boot
    rc, out, err = run_cli(env, "wait-times")
    assert rc == 0 and "small" in out and "p95" in out and "0% (0/1)" in out

    # the launch failure is remembered with its reason
    wait_until(lambda: waits.read_failures(store.list_components("launcher")),
               timeout=15, message="failures flushed")
    failure = waits.read_failures(store.list_components("launcher"))[0]
    assert failure["provider"] == "bad" and failure["label"] == "doomed" and failure["reason"]

    # Prometheus has the same split
    with urllib.request.urlopen(f"http://127.0.0.1:{launcher.webapp.port}/metrics") as resp:
        text = resp.read().decode()
    assert 'nodepool_request_wait_seconds_count{kind="warm",label="small",provider="sim"}' in text
    assert 'nodepool_request_wait_seconds_count{kind="cold",label="big",provider="sim"}' in text


def test_builder_statsd(tmp_path, statsd_listener, caplog):
    from integration.test_builder import Env, build_and_upload
    world = Env(tmp_path)
    world.write_config()
    try:
        builder = world.builder()
        store = world.open_store()
        build = build_and_upload(builder, store)
        builder.janitor_pass()
        listener = statsd_listener
        listener.wait_for(
            "nodepool.dib_image_build.ubuntu.status.rc",
            "nodepool.dib_image_build.ubuntu.status.duration",
            "nodepool.dib_image_build.ubuntu.status.last_build",
            "nodepool.dib_image_build.ubuntu.qcow2.size",
            "nodepool.image_update.ubuntu.sim-a", "nodepool.image_update.ubuntu.sim-b",
            "nodepool.builder.test-builder.image.ubuntu.build.state",
            "nodepool.builder.test-builder.image.ubuntu.provider.sim-a.upload.state",
            "nodepool.image_build_requests", "nodepool.image.ubuntu.image_build_requests")
        assert listener.last("nodepool.dib_image_build.ubuntu.status.rc") == 0
        size = os.stat(world.images_dir / f"ubuntu-{build.id}.qcow2").st_blocks * 512
        assert listener.last("nodepool.dib_image_build.ubuntu.qcow2.size") == size
        assert listener.last("nodepool.builder.test-builder.image.ubuntu.build.state") == 0
        assert listener.last("nodepool.image_build_requests") == 0
        kinds = {(n, k) for n, _, k in listener.metrics()}
        assert {("nodepool.image_update.ubuntu.sim-a", "c"),
                ("nodepool.image_update.ubuntu.sim-a", "ms")} <= kinds
        # a paused image reports 3
        store.set_image_paused("ubuntu", True)
        builder.janitor_pass()
        wait_until(lambda: listener.last(
            "nodepool.builder.test-builder.image.ubuntu.build.state") == 3)
    finally:
        world.close()


def test_one_launcher_sends_the_node_gauges_and_another_takes_over(launcher_env):
    from nodepool.launcher.observer import Observer
    launcher_env.write(CONFIG)
    first, second = launcher_env.store(), launcher_env.store()
    a = Observer(first, lambda: None, None, "a")
    b = Observer(second, lambda: None, None, "b")
    assert a._elected() and not b._elected()
    assert a._elected()              # keeps it
    a.stop()                         # releases the lock (as a dead session would)
    assert not b._elected()          # it tries again only every ELECTION_RETRY_SECONDS
    b._next_election = 0.0
    wait_until(b._elected, message="the second launcher takes over")
    assert not a._elected()
    b.stop()


def test_launcher_process_and_cli_process(sqlite_launcher_env, statsd_listener):
    """The daemon as operators run it reads STATSD_HOST/PORT from its environment; the CLI, as
    another process, reads the waits that daemon recorded."""
    import subprocess
    import sys
    from fixtures.launcher import REPO
    env = sqlite_launcher_env
    env.write(CONFIG)
    env.spawn_launcher()
    client = env.client()
    fulfil_and_return(client, ["big"])
    statsd_listener.wait_for("nodepool.launch.provider.sim.ready",
                             "nodepool.request_wait.label.big.cold", "nodepool.nodes.ready")

    def wait_times():
        proc = subprocess.run(
            [sys.executable, "-m", "nodepool.cli.nodepool", "-c", env.config_path,
             "wait-times", "--by-provider"], capture_output=True, text=True, timeout=60,
            env=dict(os.environ, PYTHONPATH=REPO))
        assert proc.returncode == 0, proc.stderr
        return proc.stdout
    out = wait_until(lambda: "big" in (text := wait_times()) and text, timeout=20,
                     interval=0.5, message="wait-times shows the request")
    row = next(line for line in out.splitlines() if "| big" in line)
    assert "| sim" in row and "0% (0/1)" in row
