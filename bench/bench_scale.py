#!/usr/bin/env python3
"""How the launcher's cost grows with its fleet: one simulated provider, label ``small`` with
min-ready N, boot time 0.1 s, the launcher as its own process.

For each N (default 200, 1000, 3000) and store it prints:
  fill_s            launcher start -> N ready nodes
  fill_cpu_s        launcher CPU for that, and per node launched (ms)
  idle_cpu_pct      launcher CPU with nothing to do (from 10 s after the last min-ready
                    request of the fill ended), in % of one core, over --idle-seconds
                    (default 60: one whole cycle of the periodic work, the 60 s leak scan
                    and lock collection included, which a 10 s window hits or misses);
                    idle_cpu_threads_pct sums the threads alive at both ends, and
                    idle_cpu_by_thread_s names the busiest (by thread id)
  list_s            ``nodepool list`` (a fresh process) wall time
  ready_ms          ready-node request latency over 30 sequential requests (median / max)
  zk_packets_per_request  (ZooKeeper) packets the server received per ready-node request,
                    all clients and the launcher included (the ``mntr`` counter)
``--profile`` runs the launcher under cProfile and prints its top functions for the fill.
Prints figures; asserts nothing about time.  Usage:
  python bench/bench_scale.py [--sizes 200,1000,3000] [--store sqlite|zookeeper|both] [--profile]
                              [--idle-seconds S] [--py-spy DIR] [--log-dir DIR]
"""
import argparse
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from bench_launcher import (cpu_seconds, ready_unallocated, wait_for,  # noqa: E402
                            write_config, zk_packets)
from nodepool.client import NodepoolClient  # noqa: E402
from nodepool.config import load_config  # noqa: E402
from nodepool.store import open_store  # noqa: E402


def start_launcher(config, logfile, profile_to=None):
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = [sys.executable]
    if profile_to:
        cmd += ["-m", "cProfile", "-o", profile_to]
    cmd += ["-m", "nodepool.cli.launcher"]
    cmd += ["-f", "-c", config, "--no-webapp"]
    return subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def thread_cpu(pid):
    """tid -> (thread name, CPU seconds) of the process's live threads (Python thread names
    are set with prctl only by some libraries; the rest show the process name)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, _, rest = f.read().rpartition(")")
            fields = rest.split()
            out[tid] = (f"{head.split('(', 1)[1]}:{tid}", (int(fields[11]) + int(fields[12])) / ticks)
        except OSError:
            continue
    return out


def args_fill_timeout(n):
    return 120 + n * 0.5


def spy_on(pid, path):
    """py-spy (all threads, GIL holders only: where the CPU goes) on ``pid`` into ``path``."""
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--format", "raw",
                             "--threads", "--gil", "--rate", "200", "-o", path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def spy_off(spy):
    if spy is not None:
        spy.send_signal(2)
        spy.wait(30)


def run_one(n, store_kind, tmp, zk_hosts, profile, spy_dir=None, idle_seconds=60,
            log_dir=None):
    tmp = os.path.join(tmp, f"{store_kind}-{n}")      # its own simulated cloud, too
    os.makedirs(tmp)
    if store_kind == "sqlite":
        store_lines = f"embedded-store:\n  path: {tmp}/state.sqlite"
    else:
        host, port = zk_hosts.rsplit(":", 1)
        store_lines = (f"zookeeper-servers:\n  - host: {host}\n    port: {port}\n"
                       f"    chroot: /scale-{os.getpid()}-{n}\n"
                       f"embedded-store:\n  path: {tmp}/unused.sqlite")
    config = os.path.join(tmp, f"nodepool-{store_kind}-{n}.yaml")
    write_config(config, n, n + 50, 0.1, store_lines)
    out = {"n": n, "store": store_kind}
    store = open_store(load_config(config))
    store.start()
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    log = open(os.path.join(log_dir or tmp, f"launcher-{store_kind}-{n}.log"), "w")
    prof = os.path.join(tmp, f"launcher-{store_kind}-{n}.prof") if profile else None
    proc = start_launcher(config, log, prof)
    try:
        t0 = time.monotonic()
        ok = wait_for(lambda: len(ready_unallocated(store)) >= n, args_fill_timeout(n),
                      interval=0.2)
        out["fill_s"] = round(time.monotonic() - t0, 1) if ok else None
        if not ok:
            out["fill_timeout"] = (f"{len(ready_unallocated(store))} of {n} nodes ready after "
                                   f"{args_fill_timeout(n)} s; see the launcher log")
            print(out, flush=True)
            return out
        out["fill_cpu_s"] = round(cpu_seconds(proc.pid), 1)
        out["fill_cpu_ms_per_node"] = round(1000 * out["fill_cpu_s"] / n, 2)
        # let the fill's tail finish (the last min-ready requests ended, their locks let go)
        # before the idle window: that work belongs to the fill, not to an idle launcher
        wait_for(lambda: not store.list_requests(), 60, interval=0.5)
        time.sleep(10)
        c0, t0 = cpu_seconds(proc.pid), thread_cpu(proc.pid)
        time.sleep(idle_seconds)
        out["idle_cpu_pct"] = round(100 * (cpu_seconds(proc.pid) - c0) / idle_seconds, 2)
        # where it went: the threads alive at both ends (a gap to the total is threads that
        # came and went, or CPU the kernel charged to the process as a whole)
        t1 = thread_cpu(proc.pid)
        spent = sorted(((t1[t][1] - t0[t][1], t1[t][0]) for t in t1 if t in t0), reverse=True)
        out["idle_cpu_threads_pct"] = round(100 * sum(c for c, _ in spent) / idle_seconds, 2)
        out["idle_cpu_by_thread_s"] = {name: round(cpu, 2) for cpu, name in spent[:4] if cpu}
        if spy_dir:
            # a window of its own: py-spy stops the process for every sample, which the
            # kernel charges to it as system time (several % of a core at 200 samples/s)
            spy = spy_on(proc.pid, os.path.join(spy_dir, f"idle-{store_kind}-{n}.raw"))
            time.sleep(idle_seconds)
            spy_off(spy)
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "nodepool.cli.nodepool", "-c", config, "list"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                       env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO)
        out["list_s"] = round(time.monotonic() - t0, 2)
        client = NodepoolClient(store, requestor="bench-scale")

        def ready_requests(count):
            """``count`` sequential ready-node requests: their latencies (seconds)."""
            lat = []
            for _ in range(count):
                if not wait_for(lambda: len(ready_unallocated(store)) >= n - 5, 60,
                                interval=0.01):
                    out["ready_wait_timeout"] = "stock not replenished within 60 s"
                    break
                time.sleep(0.05)
                t1 = time.monotonic()
                req = client.wait(client.submit(["small"]).id, timeout=120)
                lat.append(time.monotonic() - t1)
                client.release(client.accept(req))
            return lat

        packets0 = zk_packets(zk_hosts) if store_kind == "zookeeper" else None
        lat = ready_requests(30)
        if packets0 is not None:
            packets1 = zk_packets(zk_hosts)
            if packets1 is not None:
                # includes the replacement launches and deletes of the 30 used nodes
                out["zk_packets_per_request"] = round((packets1 - packets0) / 30, 1)
        if spy_dir:        # apart from the measured ones, as for idle
            spy = spy_on(proc.pid, os.path.join(spy_dir, f"ready-{store_kind}-{n}.raw"))
            ready_requests(30)
            spy_off(spy)
        out["ready_ms_median"] = round(1000 * statistics.median(lat), 1)
        out["ready_ms_max"] = round(1000 * max(lat), 1)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        store.stop()
        log.close()
    if prof and os.path.exists(prof):
        print(f"--- profile, N={n}, {store_kind}: top 25 by cumulative time")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="200,1000,3000")
    ap.add_argument("--store", default="sqlite", choices=["sqlite", "zookeeper", "both"])
    ap.add_argument("--zk", default=None, help="host:port of a ZooKeeper (default: start one)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--py-spy", metavar="DIR", default=None,
                    help="record the launcher with py-spy while idle and while serving "
                         "ready-node requests, into DIR/{idle,ready}-STORE-N.raw (in windows "
                         "of their own, after the measured ones: py-spy slows the launcher)")
    ap.add_argument("--log-dir", metavar="DIR", default=None,
                    help="keep the launcher logs there as launcher-STORE-N.log (by default "
                         "they go with the temporary directory)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = ["sqlite", "zookeeper"] if args.store == "both" else [args.store]
    tmp = tempfile.mkdtemp(prefix="nodepool-scale-")
    zk_server = None
    try:
        zk_hosts = args.zk
        if "zookeeper" in kinds and not zk_hosts:
            sys.path.insert(0, os.path.join(REPO, "tests"))
            from fixtures.zookeeper import ZooKeeperServer
            zk_server = ZooKeeperServer(os.path.join(tmp, "zookeeper"),
                                        jvm=ZooKeeperServer.SERVICE_JVM)
            zk_server.start()
            zk_hosts = zk_server.hosts
        for kind in kinds:
            for n in sizes:
                print(run_one(n, kind, tmp, zk_hosts, args.profile, args.py_spy,
                              args.idle_seconds, args.log_dir), flush=True)
    finally:
        if zk_server is not None:
            zk_server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
