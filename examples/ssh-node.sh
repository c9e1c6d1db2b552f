#!/usr/bin/env bash
# Run a command on the node `nodepool request --run` holds: ./ssh-node.sh 'uname -a'
# Reads the node from NODEPOOL_NODES (its address, port, user and scanned host keys) and logs in
# with the key $NODEPOOL_SSH_KEY (default var/demo-key), checking the host key strictly.
set -euo pipefail
cd "$(dirname "$0")/.."
KEY=${NODEPOOL_SSH_KEY:-var/demo-key}
KNOWN=$(mktemp)
trap 'rm -f "$KNOWN"' EXIT
read -r IP PORT USER < <(python3 - "$KNOWN" <<'PY'
import json, os, sys
node = json.loads(os.environ["NODEPOOL_NODES"])[0]
with open(sys.argv[1], "w") as f:
    for key in node["host_keys"] or []:
        f.write(f"[{node['interface_ip']}]:{node['connection_port']} {key}\n")
print(node["interface_ip"], node["connection_port"], node["username"])
PY
)
echo "+ ssh -p $PORT $USER@$IP $*"
exec ssh -i "$KEY" -p "$PORT" -o BatchMode=yes -o StrictHostKeyChecking=yes \
    -o UserKnownHostsFile="$KNOWN" "$USER@$IP" "$@"
