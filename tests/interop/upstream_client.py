"""Runs inside a venv with upstream Nodepool 11.0.0 and acts as Zuul does: submits node requests
with upstream's ``NodeRequest`` model, waits for them to be fulfilled, locks the nodes, marks them
in-use, then returns them used and deletes the request.  Prints one JSON line per stage.
Usage: upstream_client.py HOSTS CA CERT KEY LABEL COUNT"""
import json
import sys
import time

from nodepool.zk import ZooKeeperClient
from nodepool.zk.zookeeper import NodeRequest, ZooKeeper

hosts, ca, cert, key, label, count = sys.argv[1:7]
client = ZooKeeperClient(hosts, tls_ca=ca, tls_cert=cert, tls_key=key, timeout=10.0)
client.connect()
zk = ZooKeeper(client, enable_cache=False)

requests = []
for _ in range(int(count)):
    req = NodeRequest()
    req.state = "requested"
    req.node_types = [label]
    req.requestor = "zuul-like-upstream"
    req.relative_priority = 0
    zk.storeNodeRequest(req, priority="100")
    requests.append(req)

deadline = time.monotonic() + 120
fulfilled = {}
while len(fulfilled) < len(requests) and time.monotonic() < deadline:
    for req in requests:
        if req.id in fulfilled:
            continue
        current = zk.getNodeRequest(req.id)
        if current is not None and current.state in ("fulfilled", "failed"):
            fulfilled[req.id] = current
    time.sleep(0.05)
print(json.dumps({"stage": "fulfilled",
                  "requests": {rid: {"state": r.state, "nodes": r.nodes}
                               for rid, r in fulfilled.items()}}), flush=True)

used = {}
for rid, req in fulfilled.items():
    for node_id in req.nodes:
        node = zk.getNode(node_id)
        zk.lockNode(node, blocking=True, timeout=30)
        used[node_id] = {"allocated_to": node.allocated_to, "state_before": node.state,
                         "type": node.type, "provider": node.provider}
        node.state = "in-use"
        zk.storeNode(node)
        node.state = "used"
        zk.storeNode(node)
        zk.unlockNode(node)
    zk.deleteNodeRequest(req)
print(json.dumps({"stage": "used", "nodes": used}), flush=True)
client.disconnect()
