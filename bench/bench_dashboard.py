#!/usr/bin/env python3
"""Cost of the observability reads on the embedded store, at a sizeable installation.

Fills a fresh SQLite store with N nodes over L labels and P providers, R waiting requests,
uploads, and K launcher records each carrying a full wait ring, then times (median of runs):
  1. ``/dashboard.json``'s data (``dashboard_data``) and its JSON size;
  2. ``nodepool wait-times``' read (``wait_rows``);
  3. one flush of a full ring into a launcher record (``update_component``);
  4. the statsd node gauge values of one pass (``node_gauge_values``).
Prints figures; asserts nothing.  Usage:
  python bench/bench_dashboard.py [--nodes 2000] [--requests 200] [--launchers 3]
"""
import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nodepool import stats, waits  # noqa: E402
from nodepool.cli.wait_times import wait_rows  # noqa: E402
from nodepool.model.records import (Component, ImageBuild, ImageUpload, Node,  # noqa: E402
                                    NodeRequest)
from nodepool.model.states import BuildState, NodeState, UploadState  # noqa: E402
from nodepool.store.sqlite import SQLiteStore  # noqa: E402
from nodepool.web.dashboard import dashboard_data  # noqa: E402


def timed(fn, runs):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--labels", type=int, default=20)
    ap.add_argument("--providers", type=int, default=4)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--launchers", type=int, default=3)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    rng = random.Random(1)
    labels = [f"label-{i}" for i in range(args.labels)]
    providers = [f"cloud-{i}" for i in range(args.providers)]
    states = [NodeState.READY, NodeState.IN_USE, NodeState.BUILDING, NodeState.DELETING]
    now = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(os.path.join(tmp, "state.sqlite"))
        store.start()
        t = time.perf_counter()
        for _ in range(args.nodes):
            store.create_node(Node(state=rng.choice(states), provider=rng.choice(providers),
                                   pool="main", type=[rng.choice(labels)], state_time=now))
        for _ in range(args.requests):
            store.submit_request(NodeRequest(node_types=[rng.choice(labels)],
                                             requestor="bench", created_time=now - 30))
        for prov in providers:
            for image in ("ubuntu", "debian"):
                for age in (3600, 90000):
                    build = store.create_build(ImageBuild(image=image, state=BuildState.READY,
                                                          state_time=now - age))
                    store.create_upload(ImageUpload(image=image, build_id=build.id,
                                                    provider=prov, state=UploadState.READY,
                                                    state_time=now - age, external_id="x"))
        comps = []
        for i in range(args.launchers):
            comp = store.register_component(Component(kind="launcher", hostname=f"l{i}"))
            ring = waits.Ring(waits.RING_SIZE)
            for _ in range(waits.RING_SIZE):
                ring.add(waits.Wait(now - rng.uniform(0, 3600), rng.choice(labels),
                                    rng.choice(providers), rng.random() < 0.8,
                                    rng.expovariate(1 / 20)).to_row())
            comp.extra[waits.WAITS_KEY] = ring.rows
            store.update_component(comp)
            comps.append(comp)
        fill = time.perf_counter() - t

        dash_s, data = timed(lambda: dashboard_data(store, None, time.time()), args.runs)
        size = len(json.dumps(data))
        rows_s, rows = timed(lambda: wait_rows(store, time.time(), 3600), args.runs)
        flush_s, _ = timed(lambda: store.update_component(comps[0]), args.runs)
        record = len(json.dumps(comps[0].to_dict()))
        nodes = store.list_nodes()
        gauge_s, values = timed(lambda: stats.node_gauge_values(nodes, None), args.runs)
        store.stop()
    print(f"store: {args.nodes} nodes, {args.requests} waiting requests, "
          f"{len(providers) * 4} uploads, {args.launchers} launchers x {waits.RING_SIZE} "
          f"waits (filled in {fill:.1f}s)")
    print(f"dashboard.json data:     {dash_s * 1000:7.1f} ms  ({size / 1024:.0f} KiB JSON)")
    print(f"wait-times read:         {rows_s * 1000:7.1f} ms  ({len(rows)} label rows)")
    print(f"ring flush (1 launcher): {flush_s * 1000:7.1f} ms  ({record / 1024:.0f} KiB record)")
    print(f"node gauge values:       {gauge_s * 1000:7.1f} ms  ({len(values)} gauges)")


if __name__ == "__main__":
    main()
