#!/usr/bin/env python3
"""Launcher benchmark on the embedded store with the simulated driver.

Measures, with the launcher running as its own process (``nodepool-launcher -f``):
  1. time from launcher start to min-ready satisfied (min-ready 2, boot time 0.1 s);
  2. ready-node request latency, submit -> fulfilled, one client, requests served from
     min-ready stock (median, p95, p99): back to back, and with the launcher idle before each;
  3. sustained load: N requests from C concurrent clients (each its own store session), nodes
     launched or reused, each returned as used; latency percentiles and throughput;
  4. launcher CPU seconds for the whole run.
Prints figures; asserts nothing about time.  Usage:
  python bench/bench_launcher.py [--requests 500] [--concurrency 20] [--store sqlite|zookeeper]
"""
import argparse
import json
import os
import socket
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nodepool.client import NodepoolClient  # noqa: E402
from nodepool.config import load_config  # noqa: E402
from nodepool.model.states import NodeState  # noqa: E402
from nodepool.store import open_store  # noqa: E402


def write_config(path, min_ready, max_servers, boot_time, store_lines):
    with open(path, "w") as f:
        f.write(store_lines + "\n")
        f.write(textwrap.dedent(f"""\
            labels:
              - name: small
                min-ready: {min_ready}
            providers:
              - name: sim
                driver: simulated
                boot-time: {boot_time}
                rate: 0
                cloud-images:
                  - name: img
                pools:
                  - name: main
                    max-servers: {max_servers}
                    labels:
                      - name: small
                        cloud-image: img
            """))


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def zk_packets(hosts):
    """ZooKeeper's count of packets received (``mntr``), or None when 4lw is not allowed."""
    host, port = hosts.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.sendall(b"mntr")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("zk_packets_received"):
            return int(line.split()[1])
    return None


def pct(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, int(round(p / 100.0 * (len(values) - 1)))))
    return values[k]


def summary(name, seconds):
    ms = [s * 1000 for s in seconds]
    return {"name": name, "n": len(ms), "median_ms": round(statistics.median(ms), 2),
            "p95_ms": round(pct(ms, 95), 2), "p99_ms": round(pct(ms, 99), 2),
            "max_ms": round(max(ms), 2)}


def ready_unallocated(store):
    return [n for n in store.list_nodes()
            if n.state == NodeState.READY and not n.allocated_to]


def wait_for(cond, timeout, interval=0.002):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return False


def start_launcher(config, logfile):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (repo, os.environ.get("PYTHONPATH")) if p))
    return subprocess.Popen([sys.executable, "-m", "nodepool.cli.launcher", "-f", "-c", config,
                             "--no-webapp"], stdout=logfile, stderr=subprocess.STDOUT, env=env)


def one_request(client):
    t0 = time.monotonic()
    req = client.submit(["small"])
    req = client.wait(req.id, timeout=120)
    latency = time.monotonic() - t0
    nodes = client.accept(req)
    client.use(nodes)
    client.release(nodes)
    return latency


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--sequential", type=int, default=200)
    ap.add_argument("--boot-time", type=float, default=0.1)
    ap.add_argument("--store", default="sqlite", choices=["sqlite", "zookeeper"])
    ap.add_argument("--zk", default=None, help="host:port of a ZooKeeper for --store zookeeper "
                    "(default: start one from Debian's zookeeper package for the run)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--log", metavar="FILE", default=None,
                    help="keep the launcher's log (default: removed with the run's files)")
    ap.add_argument("--py-spy", metavar="FILE", default=None,
                    help="record the launcher (all threads) with py-spy during the load phase "
                         "into FILE (collapsed stacks, for flamegraph tools)")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="nodepool-bench-")
    results = {"store": args.store, "boot_time_s": args.boot_time}
    zk_server = None
    try:
        if args.store == "sqlite":
            store_lines = f"embedded-store:\n  path: {tmp}/state.sqlite"
        else:
            if not args.zk:
                sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "..", "tests"))
                from fixtures.zookeeper import ZooKeeperServer
                # the JVM as a ZooKeeper in service runs it: the server's CPU is measured too
                zk_server = ZooKeeperServer(os.path.join(tmp, "zookeeper"),
                                            jvm=ZooKeeperServer.SERVICE_JVM)
                zk_server.start()
                args.zk = zk_server.hosts
            host, port = args.zk.rsplit(":", 1)
            chroot = f"/bench-{os.getpid()}"
            store_lines = (f"zookeeper-servers:\n  - host: {host}\n    port: {port}\n"
                           f"    chroot: {chroot}\n"
                           f"embedded-store:\n  path: {tmp}/unused.sqlite")
        config = os.path.join(tmp, "nodepool.yaml")
        log = open(args.log or os.path.join(tmp, "launcher.log"), "w")

        # 1. start -> min-ready 2 satisfied
        write_config(config, 2, 100, args.boot_time, store_lines)
        store = open_store(load_config(config))
        store.start()
        t0 = time.monotonic()
        proc = start_launcher(config, log)
        ok = wait_for(lambda: len(ready_unallocated(store)) >= 2, 60)
        results["start_to_min_ready_2_s"] = round(time.monotonic() - t0, 3) if ok else None

        # 2. ready-node latency, one client, min-ready stock of 20
        write_config(config, 20, 100, args.boot_time, store_lines)   # reloaded on mtime change
        wait_for(lambda: len(ready_unallocated(store)) >= 20, 60)
        client = NodepoolClient(store, requestor="bench")
        lat = []
        for _ in range(args.sequential):
            wait_for(lambda: len(ready_unallocated(store)) >= 1, 30)
            lat.append(one_request(client))
        results["ready_node_latency"] = summary(
            "ready node, back to back (the launcher is still replacing the last node)", lat)

        # the request path alone: each request arrives at an idle launcher with stock waiting
        def settled():
            return (len(ready_unallocated(store)) >= 20 and not store.list_requests()
                    and all(n.state == NodeState.READY for n in store.list_nodes()))
        lat = []
        for _ in range(min(args.sequential, 100)):
            wait_for(settled, 30)
            time.sleep(0.05)
            lat.append(one_request(client))
        results["ready_node_latency_idle"] = summary("ready node, idle launcher", lat)

        # 3. sustained load
        wait_for(lambda: len(ready_unallocated(store)) >= 20, 60)
        # the watching store of the phases above is not part of the load: with ZooKeeper its
        # cache would read every record the clients and the launcher write
        store.stop()
        cpu0 = cpu_seconds(proc.pid)
        latencies, errors = [], []
        counter = {"left": args.requests}
        mutex = threading.Lock()

        def worker():
            s = open_store(load_config(config))
            s.start()
            c = NodepoolClient(s, requestor="bench-load")
            try:
                while True:
                    with mutex:
                        if counter["left"] <= 0:
                            return
                        counter["left"] -= 1
                    try:
                        latencies.append(one_request(c))
                    except Exception as exc:   # report, keep going
                        errors.append(str(exc))
            finally:
                s.stop()

        threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
        spy = None
        if args.py_spy:
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(proc.pid), "--format",
                                    "raw", "--threads", "--gil", "-o", args.py_spy, "--rate", "200"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        packets0 = zk_packets(args.zk) if args.store == "zookeeper" else None
        clients_cpu0 = time.process_time()
        server_cpu0 = cpu_seconds(zk_server.process.pid) if zk_server is not None else None
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)
        results["load"] = summary(f"{args.requests} requests, {args.concurrency} concurrent",
                                  latencies)
        results["load"]["throughput_rps"] = round(len(latencies) / elapsed, 1)
        results["load"]["errors"] = len(errors)
        # the clients are threads of this one process: when it is busy, they are the limit
        results["load"]["clients_cpu_s"] = round(time.process_time() - clients_cpu0, 2)
        if server_cpu0 is not None:
            results["load"]["zookeeper_cpu_s"] = round(cpu_seconds(zk_server.process.pid) - server_cpu0, 2)
        if packets0 is not None:
            packets1 = zk_packets(args.zk)
            if packets1 is not None and latencies:
                # every packet the server received: clients and launcher, the replacement
                # launches and deletes of the used nodes included
                results["load"]["zk_packets_per_request"] = round(
                    (packets1 - packets0) / len(latencies), 1)
        results["load"]["launcher_cpu_s"] = round(cpu_seconds(proc.pid) - cpu0, 2)
        results["launcher_cpu_s_total"] = round(cpu_seconds(proc.pid), 2)
        proc.terminate()
        proc.wait(30)
        log.close()
    finally:
        try:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        except NameError:
            pass
        if zk_server is not None:
            zk_server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for key, value in results.items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
