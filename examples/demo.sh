#!/usr/bin/env bash
# Install the package and run the main job for a short while: the image builder and a launcher on
# the embedded store.
#
# Real nodes where containers can run (root; podman, runc and debootstrap are installed if
# missing): the builder builds a Debian image (examples/podman.yaml), a node boots from it as a
# podman container, and a client requests it and runs a command on it over SSH.
# Elsewhere (or with DEMO_SIMULATED=1): the simulated clouds of examples/embedded.yaml, saying
# why in one line.  Stops the daemons it started when done.  DEMO_SECONDS=N to watch longer.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -e .
STATE=var
mkdir -p "$STATE"

LAUNCHER= BUILDER=
PODMAN_PROVIDER=
cleanup() {
    kill ${LAUNCHER:+"$LAUNCHER"} ${BUILDER:+"$BUILDER"} 2>/dev/null || true
    wait ${LAUNCHER:+"$LAUNCHER"} ${BUILDER:+"$BUILDER"} 2>/dev/null || true
    if [ -n "$PODMAN_PROVIDER" ]; then
        # the demo's nodes go with it (its image stays; the next run's builder removes it)
        podman ps -aq --filter "label=nodepool_provider_name=$PODMAN_PROVIDER" \
            | xargs -r podman rm -f -t 0 >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

# -- can this machine run real nodes? -------------------------------------------------------------
why_not=
if [ -n "${DEMO_SIMULATED:-}" ]; then
    why_not="DEMO_SIMULATED is set"
elif [ "$(id -u)" != 0 ]; then
    why_not="real container nodes need root (rootful podman, debootstrap)"
else
    need=()
    command -v podman >/dev/null 2>&1 || need+=(podman)
    command -v runc >/dev/null 2>&1 || need+=(runc)
    command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
    if [ ${#need[@]} -gt 0 ]; then
        if command -v apt-get >/dev/null 2>&1; then
            echo "== installing ${need[*]} (apt-get)"
            export DEBIAN_FRONTEND=noninteractive
            # packages must not start services
            [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
            apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
                || why_not="could not install ${need[*]} with apt-get"
        else
            why_not="podman, runc and debootstrap are not installed and there is no apt-get"
        fi
    fi
    if [ -z "$why_not" ]; then
        why_not=$(python3 -m nodepool.drivers.podman.probe --runtime runc) && why_not=
    fi
fi

if [ -n "$why_not" ]; then
    # -- simulated clouds -------------------------------------------------------------------------
    echo "== real nodes are not available here: $why_not; using the simulated clouds (examples/embedded.yaml)"
    CONFIG=examples/embedded.yaml
    rm -f "$STATE"/nodepool.sqlite* "$STATE"/simulated-*.json*
    nodepool -c "$CONFIG" config-validate
    nodepool-launcher -f -c "$CONFIG" >"$STATE/launcher.log" 2>&1 &
    LAUNCHER=$!
    nodepool-builder -f -c "$CONFIG" >"$STATE/builder.log" 2>&1 &
    BUILDER=$!
    for i in $(seq 1 "${DEMO_SECONDS:-12}"); do
        sleep 1
        clear 2>/dev/null || true
        echo "== after ${i}s: nodepool list (launcher log: $STATE/launcher.log)"
        nodepool -c "$CONFIG" list || true
        echo "== nodepool dib-image-list"; nodepool -c "$CONFIG" dib-image-list || true
        echo "== nodepool image-list"; nodepool -c "$CONFIG" image-list || true
    done
    echo "== a client asks for one debian-small node and one debian-large node"
    nodepool -c "$CONFIG" request debian-small debian-large --timeout 60
    echo "== nodepool request-list"; nodepool -c "$CONFIG" request-list
    echo "== status API: curl http://127.0.0.1:8005/label-list"
    python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:8005/label-list").read().decode())' || true
    sleep 2
    echo "== nodepool list (the used nodes are deleted, min-ready refills)"
    nodepool -c "$CONFIG" list
    exit 0
fi

# -- real nodes: podman containers booted from the image the builder builds --------------------------
CONFIG=examples/podman.yaml
PODMAN_PROVIDER=local
echo "== real nodes: podman (runtime runc) on this machine; config $CONFIG"
# a fresh store; containers and images of an earlier run are then leaks the daemons remove
rm -f "$STATE"/nodepool.sqlite*
[ -f "$STATE/demo-key" ] || ssh-keygen -q -t ed25519 -N '' -C nodepool-demo -f "$STATE/demo-key"
export DIB_DEV_USER_AUTHORIZED_KEYS="$PWD/$STATE/demo-key.pub"
nodepool -c "$CONFIG" config-validate
started=$(date +%s)
nodepool-builder -f -c "$CONFIG" >"$STATE/builder.log" 2>&1 &
BUILDER=$!
nodepool-launcher -f -c "$CONFIG" >"$STATE/launcher.log" 2>&1 &
LAUNCHER=$!

ready_node() { nodepool -c "$CONFIG" list --json 2>/dev/null | python3 -c '
import json, sys
rows = json.load(sys.stdin)
rows = rows.get("nodes", rows) if isinstance(rows, dict) else rows
print(next((r.get("id") for r in rows if r.get("state") == "ready"), ""))' 2>/dev/null || true; }

deadline=$((started + ${DEMO_READY_TIMEOUT:-400}))
while :; do
    sleep 2
    clear 2>/dev/null || true
    now=$(date +%s)
    echo "== after $((now - started))s (the first build bootstraps Debian, ~1 min; later builds reuse it)"
    echo "== nodepool dib-image-list"; nodepool -c "$CONFIG" dib-image-list || true
    echo "== nodepool image-list"; nodepool -c "$CONFIG" image-list || true
    echo "== nodepool list (launcher log: $STATE/launcher.log, builder log: $STATE/builder.log)"
    nodepool -c "$CONFIG" list || true
    node=$(ready_node)
    if [ -n "$node" ]; then
        echo "== node $node is ready $((now - started))s after the builder started"
        break
    fi
    if [ "$now" -ge "$deadline" ]; then
        echo "== no ready node after $((now - started))s; last lines of the logs:" >&2
        tail -n 5 "$STATE/builder.log" "$STATE/launcher.log" >&2
        exit 1
    fi
done

echo "== a client requests a debian-node and runs a job on it over SSH"
nodepool -c "$CONFIG" request debian-node --timeout 120 \
    --run 'bash examples/ssh-node.sh "uname -a; id; python3 --version; sudo -n true && echo sudo works"'
echo "== podman ps (one container per node, labelled with its node, provider and pool)"
podman ps --filter label=nodepool_provider_name=local \
    --format '{{.Names}}  {{.Status}}  {{.Ports}}  node={{index .Labels "nodepool_node_id"}}'
sleep "${DEMO_SECONDS:-3}"
echo "== nodepool list (the used node is deleted, min-ready refills)"
nodepool -c "$CONFIG" list
