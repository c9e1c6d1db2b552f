"""Upstream Nodepool 11.0.0's ZooKeeper code and our ZooKeeperStore read each other's records.

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


@pytest.fixture(scope="session")
def upstream_python(tmp_path_factory):
    venv = os.environ.get("NODEPOOL_UPSTREAM_VENV")
    if not venv and not os.environ.get("NODEPOOL_INTEROP"):
        pytest.skip("set NODEPOOL_INTEROP=1 (or NODEPOOL_UPSTREAM_VENV) to run the upstream interop test")
    if not venv:
        venv = str(tmp_path_factory.mktemp("np11-venv"))
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = os.path.join(venv, "bin", "python")
    probe = subprocess.run([python, "-c", "import nodepool.zk.zookeeper"], capture_output=True)
    if probe.returncode != 0:
        install = subprocess.run([python, "-m", "pip", "install", "-q", "nodepool==11.0.0"],
                                 capture_output=True, text=True)
        if install.returncode != 0:
            pytest.skip(f"cannot install nodepool==11.0.0: {install.stderr.strip()[-300:]}")
    return python


def test_upstream_reads_ours_and_we_read_upstream(upstream_python, zookeeper_server, zk_chroot):
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
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
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
        lock.release()
    finally:
        if peer is not None:
            peer.stdin.close()
            peer.wait(timeout=30)
        store.stop()
