"""Upstream Nodepool 11.0.0's ZooKeeper code and ours, end to end: records both ways (upstream's
daemon-side code and our CLI), upstream's client (as Zuul uses it) served by our launcher process,
and upstream's CLI (``list``, ``request-list``, ``dib-image-list``, ``image-list``) on our records.

Marked ``interop``: it builds a venv and pip-installs nodepool==11.0.0 (minutes, needs the package
registry), so it runs only when ``NODEPOOL_INTEROP=1`` or ``NODEPOOL_UPSTREAM_VENV`` (an existing
venv to reuse) is set.
"""
import json
import os
import subprocess
import sys

import pytest

from nodepool.model.records import ImageBuild, ImageUpload, Node, NodeRequest
from nodepool.model.states import NodeState
from nodepool.store.zookeeper import ZooKeeperStore

pytestmark = [pytest.mark.interop, pytest.mark.slow]

HERE = os.path.dirname(__file__)


def _upstream_env():
    """Our environment minus PYTHONPATH: upstream's venv must import its own ``nodepool``."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


@pytest.fixture(scope="session")
def upstream_python(tmp_path_factory):
    venv = os.environ.get("NODEPOOL_UPSTREAM_VENV")
    if not venv and not os.environ.get("NODEPOOL_INTEROP"):
        pytest.skip("set NODEPOOL_INTEROP=1 (or NODEPOOL_UPSTREAM_VENV) to run the upstream interop test")
    if not venv:
        venv = str(tmp_path_factory.mktemp("np11-venv"))
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = os.path.join(venv, "bin", "python")
    probe = subprocess.run([python, "-c", "import nodepool.zk.zookeeper"], capture_output=True,
                           cwd="/", env=_upstream_env())
    if probe.returncode != 0:
        install = subprocess.run([python, "-m", "pip", "install", "-q", "nodepool==11.0.0"],
                                 capture_output=True, text=True, env=_upstream_env())
        if install.returncode != 0:
            pytest.skip(f"cannot install nodepool==11.0.0: {install.stderr.strip()[-300:]}")
    # upstream's drivers import cachetools without declaring it: its CLI needs it
    probe = subprocess.run([python, "-c", "import cachetools"], capture_output=True, cwd="/",
                           env=_upstream_env())
    if probe.returncode != 0:
        subprocess.run([python, "-m", "pip", "install", "-q", "cachetools"], check=True,
                       env=_upstream_env())
    return python


def test_upstream_reads_ours_and_we_read_upstream(upstream_python, zookeeper_server, zk_chroot,
                                                   tmp_path):
    store = ZooKeeperStore(zookeeper_server.tls_hosts, chroot=zk_chroot,
                           tls=zookeeper_server.tls, timeout=10.0)
    store.start()
    peer = None
    try:
        node = store.create_node(Node(state=NodeState.READY, type=["small"], provider="p1",
                                      interface_ip="192.0.2.1", allocated_to="100-0000000001"))
        lock = store.lock_node(node.id)
        req = store.submit_request(NodeRequest(node_types=["small", "big"], requestor="us",
                                               relative_priority=3), priority="100")
        build = store.create_build(ImageBuild(image="img", builder="b1", formats="qcow2,raw"))
        upload = store.create_upload(ImageUpload(image="img", build_id=build.id, provider="p1",
                                                 external_id="ami-1"))
        ids = {"node": node.id, "request": req.id, "image": "img", "build": build.id,
               "provider": "p1", "upload": upload.id}
        ca, cert, key = zookeeper_server.tls
        peer = subprocess.Popen(
            [upstream_python, os.path.join(HERE, "upstream_peer.py"),
             zookeeper_server.tls_hosts + zk_chroot, ca, cert, key, json.dumps(ids)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_upstream_env())
        line = peer.stdout.readline()
        assert line, "upstream peer printed nothing"
        seen = json.loads(line)
        assert seen["node"] == {"state": "ready", "type": ["small"], "provider": "p1",
                                "allocated_to": "100-0000000001", "interface_ip": "192.0.2.1"}
        assert seen["request"] == {"state": "requested", "node_types": ["small", "big"],
                                   "requestor": "us", "relative_priority": 3}
        assert seen["build"]["state"] == "building"
        assert seen["build"]["builder"] == "b1" and seen["build"]["formats"] == ["qcow2", "raw"]
        assert seen["upload"] == {"state": "uploading", "external_id": "ami-1"}
        assert seen["locked_ours"] is False          # our lock blocks upstream's lockNode

        theirs = store.get_node(seen["written_node"])
        assert theirs.state == NodeState.READY and theirs.type == ["upstream-label"]
        their_req = store.get_request(seen["written_request"])
        assert their_req.id.startswith("200-") and their_req.node_types == ["upstream-label"]
        their_build = store.get_build("upstream-image", seen["written_build"])
        assert their_build.builder == "upstream-builder" and their_build.format_list == ["qcow2"]
        their_upload = store.get_upload("upstream-image", seen["written_build"], "cloud9",
                                        seen["written_upload"])
        assert their_upload.external_id == "ext-1"
        # and our CLI shows what upstream's daemon-side code wrote
        config = _our_config(tmp_path / "ours.yaml", zookeeper_server, zk_chroot)
        listing = _our_cli(config, "list")
        row = next(line for line in listing.splitlines() if seen["written_node"] in line)
        assert "upstream-provider" in row and "upstream-label" in row and "ready" in row
        dib = _our_cli(config, "dib-image-list")
        row = next(line for line in dib.splitlines() if seen["written_build"] in line)
        assert "upstream-builder" in row and "qcow2" in row and "ready" in row
        images = _our_cli(config, "image-list")
        row = next(line for line in images.splitlines() if "ext-1" in line)
        assert "cloud9" in row and seen["written_build"] in row and "ready" in row
        assert seen["written_request"] in _our_cli(config, "request-list")
        lock.release()
    finally:
        if peer is not None:
            peer.stdin.close()
            peer.wait(timeout=30)
        store.stop()


# -- end to end: upstream's client and CLI against our launcher process, our CLI on theirs ---------

def _our_config(path, zookeeper_server, chroot, body=""):
    ca, cert, key = zookeeper_server.tls
    host, port = zookeeper_server.tls_hosts.rsplit(":", 1)
    path.write_text(f"zookeeper-servers:\n  - host: {host}\n    port: {port}\n    chroot: {chroot}\n"
                    f"zookeeper-tls:\n  ca: {ca}\n  cert: {cert}\n  key: {key}\n"
                    f"zookeeper-timeout: 10\n" + body)
    return str(path)


OUR_LAUNCHER_BODY = """\
labels:
  - name: small
    min-ready: {min_ready}
providers:
  - name: sim
    driver: simulated
    boot-time: 0.05
    state-file: {tmp}/sim.cloud
    cloud-images:
      - name: img
    pools:
      - name: main
        max-servers: 10
        labels:
          - name: small
            cloud-image: img
"""

# upstream's CLI needs a config it accepts: a provider of a driver it knows is enough for listing
UPSTREAM_CLI_BODY = """\
labels:
  - name: small
providers:
  - name: sim
    driver: static
    pools:
      - name: main
        nodes:
          - name: static.example.com
            labels: [small]
"""


def _upstream_cli(upstream_python, config, *args):
    cli = os.path.join(os.path.dirname(upstream_python), "nodepool")
    out = subprocess.run([cli, "-c", config, *args], capture_output=True, text=True,
                         timeout=120, cwd="/", env=_upstream_env())
    assert out.returncode == 0, f"upstream nodepool {' '.join(args)}: {out.stderr[-2000:]}"
    return out.stdout


def _our_cli(config, *args):
    out = subprocess.run([sys.executable, "-m", "nodepool.cli.nodepool", "-c", config, *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"our nodepool {' '.join(args)}: {out.stderr[-2000:]}"
    return out.stdout


def test_upstream_client_and_cli_with_our_launcher(upstream_python, zookeeper_server, zk_chroot,
                                                    tmp_path):
    from fixtures.launcher import wait_until
    ours = _our_config(tmp_path / "ours.yaml", zookeeper_server, zk_chroot,
                       OUR_LAUNCHER_BODY.format(min_ready=0, tmp=tmp_path))
    theirs = _our_config(tmp_path / "upstream.yaml", zookeeper_server, zk_chroot,
                         UPSTREAM_CLI_BODY)
    log = open(tmp_path / "launcher.log", "w")
    launcher = subprocess.Popen([sys.executable, "-m", "nodepool.cli.launcher", "-f", "-c", ours,
                                 "--no-webapp"], stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(
                                    HERE))))
    store = ZooKeeperStore(zookeeper_server.tls_hosts, chroot=zk_chroot,
                           tls=zookeeper_server.tls, timeout=10.0)
    store.start()
    try:
        wait_until(lambda: store.list_components("pool"), timeout=60,
                   message="our launcher registered its pool")
        # 1. upstream's client (as Zuul uses it) against our launcher
        ca, cert, key = zookeeper_server.tls
        client = subprocess.run(
            [upstream_python, os.path.join(HERE, "upstream_client.py"),
             zookeeper_server.tls_hosts + zk_chroot, ca, cert, key, "small", "3"],
            capture_output=True, text=True, timeout=300, cwd="/", env=_upstream_env())
        assert client.returncode == 0, client.stderr[-3000:]
        fulfilled, used = (json.loads(line) for line in client.stdout.splitlines())
        reqs = fulfilled["requests"]
        assert len(reqs) == 3 and all(r["state"] == "fulfilled" for r in reqs.values())
        node_ids = [nid for r in reqs.values() for nid in r["nodes"]]
        assert len(node_ids) == len(set(node_ids)) == 3
        for rid, r in reqs.items():
            [nid] = r["nodes"]
            assert used["nodes"][nid]["allocated_to"] == rid
            assert used["nodes"][nid]["state_before"] == "ready"
            assert used["nodes"][nid]["type"] == ["small"]
            assert used["nodes"][nid]["provider"] == "sim"
        # the used nodes are deleted by our launcher
        wait_until(lambda: not set(node_ids) & {n.id for n in store.list_nodes()}, timeout=60,
                   message="used nodes deleted")

        # 2. upstream's CLI lists our nodes, requests, builds and uploads
        # min-ready 2 (our launcher rereads its changed config): ready nodes to list
        _our_config(tmp_path / "ours.yaml", zookeeper_server, zk_chroot,
                    OUR_LAUNCHER_BODY.format(min_ready=2, tmp=tmp_path))
        wait_until(lambda: len([n for n in store.list_nodes()
                                if str(n.state) == "ready" and not n.allocated_to]) >= 2,
                   timeout=60, message="min-ready nodes")
        ready = [n for n in store.list_nodes() if str(n.state) == "ready"]
        listing = _upstream_cli(upstream_python, theirs, "list")
        for node in ready:
            row = next((line for line in listing.splitlines() if f" {node.id} " in line), None)
            assert row is not None, listing
            assert " sim " in row and " small " in row and " ready " in row
            assert node.external_id in row
        pending = store.submit_request(NodeRequest(node_types=["nobody-serves-this"],
                                                   requestor="ours"), priority="300")
        requests_out = _upstream_cli(upstream_python, theirs, "request-list")
        assert pending.id in requests_out and "nobody-serves-this" in requests_out
        build = store.create_build(ImageBuild(image="img", builder="our-builder",
                                              formats="qcow2"))
        build.state = "ready"
        store.update_build(build)
        upload = store.create_upload(ImageUpload(image="img", build_id=build.id, provider="sim",
                                                 external_id="sim-image-1",
                                                 external_name="img-1"))
        upload.state = "ready"
        store.update_upload(upload)
        dib = _upstream_cli(upstream_python, theirs, "dib-image-list")
        row = next(line for line in dib.splitlines() if build.id in line)
        assert "our-builder" in row and "qcow2" in row and "ready" in row
        images = _upstream_cli(upstream_python, theirs, "image-list")
        row = next(line for line in images.splitlines() if "sim-image-1" in line)
        assert build.id in row and " sim " in row and "ready" in row and upload.id in row
    finally:
        launcher.send_signal(15)
        try:
            launcher.wait(30)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
        log.close()
        store.stop()
