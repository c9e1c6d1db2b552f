"""Podman driver benchmark with real containers on this machine (prints figures, asserts nothing).

    python bench/bench_podman.py [--burst 20] [--warm 3] [--max-servers 10]

Root, podman and runc needed (``python3 -m nodepool.drivers.podman.probe`` says whether
containers run here).  The builder and the launcher run in threads of this process with their
production intervals, on an embedded SQLite store in a temp dir; the Debian root is the shipped
build command's (its debootstrap tarball cached in ``~/.cache/image-create``; a cold bootstrap
adds about a minute to the first figure).

Figures:
* build -> first ready node: builder and launcher started together with ``min-ready: 1`` and no
  image; seconds until the image is built, uploaded (podman import) and a node from it is ready;
* cold launch -> SSH-ready: a request with no ready node: seconds until it is fulfilled (container
  started, host keys scanned) and until a first SSH command on it returned;
* request -> node from a warm pool: ``--warm`` requests, each served from ``min-ready`` nodes;
* launches per minute: ``--burst`` requests submitted at once (``max-servers`` nodes at a time):
  nodes made ready per minute, and per minute for the adapter alone (``podman run`` + inspect
  of ``--burst`` containers advanced from one loop, then deleted).
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from fixtures.launcher import wait_until                 # noqa: E402
from fixtures.podman import node_config, remove_labelled  # noqa: E402

from nodepool.builder.builder import Builder            # noqa: E402
from nodepool.client import NodepoolClient               # noqa: E402
from nodepool.config import load_config                  # noqa: E402
from nodepool.drivers import get_driver                  # noqa: E402
from nodepool.drivers.base import (META_NODE_ID, META_POOL, META_PROVIDER,  # noqa: E402
                                   LaunchSpec)
from nodepool.drivers.podman.probe import runtime_problem  # noqa: E402
from nodepool.drivers.podman.runtime import Podman       # noqa: E402
from nodepool.launcher.launcher import Launcher          # noqa: E402
from nodepool.model.images import newest_ready_upload    # noqa: E402
from nodepool.store import open_store                    # noqa: E402

PROVIDER = "bench-podman"


def write_config(path, work, key, min_ready, max_servers):
    text = node_config(work, PROVIDER, {"DIB_DEV_USER_AUTHORIZED_KEYS": f"{key}.pub"},
                       min_ready=min_ready, max_servers=max_servers,
                       provider_extra="max-cores: 64")
    with open(path, "w") as f:
        f.write(f"embedded-store:\n  path: {work}/nodepool.sqlite\n" + text)
    # a rewrite within the same second must look changed to the daemons
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def ready_nodes(store):
    return [n for n in store.list_nodes() if str(n.state) == "ready" and not n.allocated_to]


def ssh_ok(node, key):
    argv = ["ssh", "-i", key, "-p", str(node.connection_port), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", f"{node.username}@{node.interface_ip}", "true"]
    return subprocess.run(argv, capture_output=True).returncode == 0


def start(obj):
    obj.start()
    thread = threading.Thread(target=obj.run, daemon=True)
    thread.start()
    return thread


def stop(daemon, threads):
    """Stop a daemon started by ``start`` and wait for its thread (and workers) to end."""
    daemon.stop()
    threads.pop(daemon).join(60)
    if hasattr(daemon, "shutdown"):
        daemon.shutdown()


def adapter_burst(config_path, store, count):
    """``count`` launches advanced from one loop, as a provider worker does; then deletes."""
    prov = load_config(config_path).providers[PROVIDER]
    adapter = get_driver("podman").adapter(prov)
    upload = newest_ready_upload(store.list_uploads(), "debian-node", PROVIDER)
    pool = prov.pools["main"]
    machines = []
    for i in range(count):
        node_id = f"99{i:08d}"
        machines.append(adapter.create_state_machine(LaunchSpec(
            hostname=f"np{node_id}", label=pool.labels["debian-node"], pool=pool,
            metadata={META_NODE_ID: node_id, META_POOL: "main", META_PROVIDER: PROVIDER},
            image_external_id=upload.external_id, node_id=node_id)))
    t0 = time.monotonic()
    pending = list(machines)
    while pending:
        pending = [m for m in pending if m.advance() is None]
        time.sleep(0.01)
    running = time.monotonic() - t0
    t0 = time.monotonic()
    deletes = [adapter.delete_state_machine(m.external_id) for m in machines]
    while deletes:
        deletes = [d for d in deletes if not d.advance()]
        time.sleep(0.01)
    return running, time.monotonic() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--max-servers", type=int, default=10)
    args = parser.parse_args()
    problem = runtime_problem(Podman("podman", "runc"))
    if problem:
        raise SystemExit(problem)
    work = tempfile.mkdtemp(prefix="bench-podman-")
    key = os.path.join(work, "key")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    config_path = os.path.join(work, "nodepool.yaml")
    write_config(config_path, work, key, min_ready=1, max_servers=args.max_servers)
    remove_labelled(PROVIDER)
    threads = {}          # daemon -> the thread running it
    store = open_store(load_config(config_path))
    store.start()
    try:
        t0 = time.monotonic()
        builder = Builder(config_path, hostname="bench")
        launcher = Launcher(config_path, webapp=False)
        threads[builder] = start(builder)
        threads[launcher] = start(launcher)
        wait_until(lambda: [b for b in store.list_builds() if str(b.state) == "ready"], 600,
                   message="the image build")
        built = time.monotonic() - t0
        wait_until(lambda: [u for u in store.list_uploads() if str(u.state) == "ready"], 300,
                   message="the upload")
        uploaded = time.monotonic() - t0
        wait_until(lambda: ready_nodes(store), 300, message="the first ready node")
        first = time.monotonic() - t0
        print(f"build -> first ready node: {first:.1f} s (build ready {built:.1f} s, "
              f"upload ready {uploaded:.1f} s, node {first - uploaded:.1f} s after the upload)")

        client = NodepoolClient(store, requestor="bench")
        warm = []
        for _ in range(args.warm):
            wait_until(lambda: ready_nodes(store), 120, message="a ready node")
            t = time.monotonic()
            nodes = client.request(["debian-node"], timeout=120)
            warm.append(time.monotonic() - t)
            client.release(nodes)
        print(f"request -> node from a warm pool: median {statistics.median(warm):.3f} s "
              f"(max {max(warm):.3f} s, {len(warm)} requests)")

        # no ready node: min-ready 0, wait until the pool is empty
        write_config(config_path, work, key, min_ready=0, max_servers=args.max_servers)
        wait_until(lambda: not store.list_nodes(), 120, interval=0.2,
                   message="the ready pool to drain (min-ready 0)")
        cold, cold_ssh = [], []
        for _ in range(3):
            t = time.monotonic()
            [node] = client.request(["debian-node"], timeout=120)
            cold.append(time.monotonic() - t)
            wait_until(lambda: ssh_ok(node, key), 60, message="ssh")
            cold_ssh.append(time.monotonic() - t)
            client.release([node])
            wait_until(lambda: store.get_node(node.id) is None, 60,
                       message="the node's deletion")
        print(f"cold launch -> node ready (host keys scanned): median "
              f"{statistics.median(cold):.2f} s; -> first SSH command done: median "
              f"{statistics.median(cold_ssh):.2f} s (3 launches)")

        t = time.monotonic()
        requests = [client.submit(["debian-node"]) for _ in range(args.burst)]
        for req in requests:
            done = client.wait(req.id, timeout=600)
            client.release(client.accept(done))
        burst = time.monotonic() - t
        print(f"burst of {args.burst} requests (max-servers {args.max_servers}): all served in "
              f"{burst:.1f} s = {args.burst / burst * 60:.0f} nodes ready per minute")
        wait_until(lambda: not store.list_nodes(), 120, interval=0.2,
                   message="the used nodes' deletion")
        stop(launcher, threads)
        running, deleted = adapter_burst(config_path, store, args.burst)
        print(f"adapter alone: {args.burst} containers running in {running:.1f} s "
              f"({args.burst / running * 60:.0f} per minute), deleted in {deleted:.1f} s")
    finally:
        for daemon in list(threads):
            stop(daemon, threads)
        store.stop()
        remove_labelled(PROVIDER)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
