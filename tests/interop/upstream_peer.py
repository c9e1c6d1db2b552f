"""Runs inside a venv with upstream Nodepool 11.0.0: reads the records our store wrote and writes
its own, printing one JSON line; keeps its session open until stdin closes (its requests are
ephemeral).  Usage: upstream_peer.py HOSTS CA CERT KEY IDS_JSON"""
import json
import sys

from nodepool.zk import ZooKeeperClient
from nodepool.zk.zookeeper import ImageBuild, ImageUpload, Node, NodeRequest, ZooKeeper

hosts, ca, cert, key, ids = sys.argv[1:6]
ids = json.loads(ids)
client = ZooKeeperClient(hosts, tls_ca=ca, tls_cert=cert, tls_key=key, timeout=10.0)
client.connect()
zk = ZooKeeper(client, enable_cache=False)

out = {}
node = zk.getNode(ids["node"])
out["node"] = {"state": node.state, "type": node.type, "provider": node.provider,
               "allocated_to": node.allocated_to, "interface_ip": node.interface_ip}
req = zk.getNodeRequest(ids["request"])
out["request"] = {"state": req.state, "node_types": req.node_types,
                  "requestor": req.requestor, "relative_priority": req.relative_priority}
build = zk.getBuild(ids["image"], ids["build"])
out["build"] = {"state": build.state, "builder": build.builder, "formats": build.formats}
upload = zk.getImageUpload(ids["image"], ids["build"], ids["provider"], ids["upload"])
out["upload"] = {"state": upload.state, "external_id": upload.external_id}
lock_node = zk.getNode(ids["node"])
try:
    zk.lockNode(lock_node, blocking=False)
    out["locked_ours"] = True
except Exception:
    out["locked_ours"] = False

new_node = Node()
new_node.state = "ready"
new_node.type = ["upstream-label"]
new_node.provider = "upstream-provider"
zk.storeNode(new_node)
out["written_node"] = new_node.id
new_req = NodeRequest()
new_req.state = "requested"
new_req.node_types = ["upstream-label"]
new_req.requestor = "upstream"
zk.storeNodeRequest(new_req, priority="200")
out["written_request"] = new_req.id
new_build = ImageBuild(image_name="upstream-image")
new_build.state = "ready"
new_build.builder = "upstream-builder"
new_build.formats = ["qcow2"]
out["written_build"] = zk.storeBuild("upstream-image", new_build)
new_upload = ImageUpload(new_build.id, "cloud9", "upstream-image")
new_upload.state = "ready"
new_upload.external_id = "ext-1"
out["written_upload"] = zk.storeImageUpload("upstream-image", out["written_build"], "cloud9",
                                            new_upload)
print(json.dumps(out), flush=True)
sys.stdin.read()
client.disconnect()
