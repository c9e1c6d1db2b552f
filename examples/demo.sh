#!/usr/bin/env bash
# Install the package and run the main job for a short while: a launcher (and the image builder)
# on the embedded store with the simulated providers of examples/embedded.yaml.  Shows nodes
# becoming ready, a node request being served, and (with the builder) images being built and
# uploaded.  Stops the daemons it started when done.  DEMO_SECONDS=N to watch longer.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -e .
CONFIG=examples/embedded.yaml
STATE=var
mkdir -p "$STATE"
rm -f "$STATE"/nodepool.sqlite* "$STATE"/simulated-*.json*
nodepool -c "$CONFIG" config-validate

nodepool-launcher -f -c "$CONFIG" >"$STATE/launcher.log" 2>&1 &
LAUNCHER=$!
BUILDER=
if nodepool-builder --help 2>/dev/null | grep -q -- --build-workers && grep -q '^diskimages' "$CONFIG"; then
    nodepool-builder -f -c "$CONFIG" >"$STATE/builder.log" 2>&1 &
    BUILDER=$!
fi
cleanup() {
    kill "$LAUNCHER" ${BUILDER:+"$BUILDER"} 2>/dev/null || true
    wait "$LAUNCHER" ${BUILDER:+"$BUILDER"} 2>/dev/null || true
}
trap cleanup EXIT

for i in $(seq 1 "${DEMO_SECONDS:-12}"); do
    sleep 1
    clear 2>/dev/null || true
    echo "== after ${i}s: nodepool list (launcher log: $STATE/launcher.log)"
    nodepool -c "$CONFIG" list || true
    if [ -n "$BUILDER" ]; then
        echo "== nodepool dib-image-list"; nodepool -c "$CONFIG" dib-image-list || true
        echo "== nodepool image-list"; nodepool -c "$CONFIG" image-list || true
    fi
done
echo "== a client asks for one debian-small node and one debian-large node"
nodepool -c "$CONFIG" request debian-small debian-large --timeout 60
echo "== nodepool request-list"; nodepool -c "$CONFIG" request-list
echo "== status API: curl http://127.0.0.1:8005/label-list"
python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:8005/label-list").read().decode())' || true
sleep 2
echo "== nodepool list (the used nodes are deleted, min-ready refills)"
nodepool -c "$CONFIG" list
