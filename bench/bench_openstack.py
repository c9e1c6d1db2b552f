"""OpenStack driver benchmark against the real local cloud (prints figures, asserts nothing).

    python bench/bench_openstack.py [--nodes 20] [--min-ready 5] [--skip-adapter]

Uses the cloud named by ``NODEPOOL_OPENSTACK_CLOUDS_YAML`` (cloud ``local``) or starts one with
``tests/fixtures/openstack/cloud.sh`` in a temp dir (root, ~45 s) and stops it afterwards.

Figures:
* adapter burst: N launches advanced from one loop (as a provider worker does): seconds until
  all are ACTIVE, seconds until all are deleted, API calls per node launched and deleted (the
  rate limiter's ``calls``), with and without floating IPs;
* launcher (in a thread, production intervals, embedded SQLite store): seconds from launcher
  start to min-ready; latency of an N-request burst submitted at once; API calls per server
  launched and per server deleted, measured over the burst (idle polling included, and its
  share printed).  The admin project's compute quota is raised for the run and restored.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

CLOUD_SH = os.path.join(REPO, "tests", "fixtures", "openstack", "cloud.sh")
LOCK_DIR = "/tmp/nodepool-openstack-cloud"      # shared with tests/fixtures/openstack.py


def ensure_cloud():
    """(clouds.yaml, stop function).  A cloud of our own takes the test fixture's lock first:
    its ports are fixed, so a test session and the bench must not run two at once."""
    reuse = os.environ.get("NODEPOOL_OPENSTACK_CLOUDS_YAML")
    if reuse:
        return reuse, lambda: None
    import fcntl
    os.makedirs(LOCK_DIR, exist_ok=True)
    lock = open(os.path.join(LOCK_DIR, "lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.chmod(LOCK_DIR, 0o755)          # the mysql/rabbitmq users must traverse it
    base = tempfile.mkdtemp(prefix="bench-", dir=LOCK_DIR)
    os.chmod(base, 0o755)
    env = dict(os.environ, BASE=base)
    t0 = time.monotonic()
    subprocess.run([CLOUD_SH, "start"], env=env, check=True, stdout=subprocess.DEVNULL)
    print(f"cloud start: {time.monotonic() - t0:.1f} s")

    def stop():
        subprocess.run([CLOUD_SH, "stop"], env=env, stdout=subprocess.DEVNULL)
        lock.close()
    return os.path.join(base, "clouds.yaml"), stop


BURST_TIMEOUT = 300      # seconds any phase of the adapter burst may wait


def _delete_now(adapter, external_id):
    """Delete one server of an abandoned burst, waiting at most BURST_TIMEOUT."""
    machine = adapter.delete_state_machine(external_id)
    deadline = time.monotonic() + BURST_TIMEOUT
    try:
        while not machine.advance():
            if time.monotonic() > deadline:
                print(f"server {external_id} not deleted after {BURST_TIMEOUT} s; the next "
                      f"leak scan of a launcher removes it")
                return
            time.sleep(0.1)
    except Exception as exc:      # report and go on: the benchmark's other phases still run
        print(f"server {external_id}: delete failed: {exc}")


def adapter_burst(nodes, floating_ips):
    from integration.test_openstack_adapter import make_provider, spec_for
    from nodepool.drivers.openstack import DRIVER
    prov = make_provider(f"bench-{os.getpid()}", pool={"auto-floating-ip": floating_ips})
    adapter = DRIVER.adapter(prov)
    adapter.start()
    adapter.flavor_for(prov.pools["main"].labels["small"])
    adapter.networks()
    if floating_ips:
        adapter.floating_network_id()
    base_calls = adapter.rate_limiter.calls
    t0 = time.monotonic()
    machines = [adapter.create_state_machine(spec_for(prov, f"{i:010d}")) for i in range(nodes)]
    done = {}
    label = "with floating IPs" if floating_ips else "fixed IPs only"
    while len(done) < nodes:
        for i, m in enumerate(machines):
            if i not in done:
                result = m.advance()
                if result is not None:
                    done[i] = result
        if time.monotonic() - t0 > BURST_TIMEOUT:
            waiting = {m.external_id or f"#{i}": getattr(m, "state", "?")
                       for i, m in enumerate(machines) if i not in done}
            print(f"adapter burst of {nodes} ({label}): {len(waiting)} server(s) not ready "
                  f"after {BURST_TIMEOUT} s (a floating IP needs an L3 agent); waiting for: "
                  f"{waiting}; deleting what was created")
            for m in machines:
                if m.external_id:
                    _delete_now(adapter, m.external_id)
            return
        time.sleep(0.05)
    launched = time.monotonic() - t0
    launch_calls = adapter.rate_limiter.calls - base_calls
    base_calls = adapter.rate_limiter.calls
    t0 = time.monotonic()
    deletes = [adapter.delete_state_machine(r.external_id) for r in done.values()]
    pending = set(range(nodes))
    while pending:
        for i in list(pending):
            if deletes[i].advance():
                pending.discard(i)
        if time.monotonic() - t0 > BURST_TIMEOUT:
            raise TimeoutError(f"adapter burst ({label}): servers "
                               f"{[deletes[i].external_id for i in pending]} not deleted "
                               f"after {BURST_TIMEOUT} s")
        time.sleep(0.05)
    deleted = time.monotonic() - t0
    delete_calls = adapter.rate_limiter.calls - base_calls
    print(f"adapter burst of {nodes} ({label}): all ACTIVE in {launched:.1f} s, all deleted in "
          f"{deleted:.1f} s; API calls per node: launch {launch_calls / nodes:.2f}, "
          f"delete {delete_calls / nodes:.2f}")


def raise_quota(conn, instances, cores, ram):
    """Lift the admin project's compute quota for the run; returns a function that restores it."""
    project = conn.current_project_id
    before = conn.compute.get_quota_set(project)
    old = {"instances": before.instances, "cores": before.cores, "ram": before.ram}
    conn.compute.update_quota_set(project, instances=instances, cores=cores, ram=ram)
    return lambda: conn.compute.update_quota_set(project, **old)


def wait_for(cond, timeout, what, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def launcher_figures(nodes, min_ready):
    """Launcher in a thread with its production intervals, embedded SQLite store.

    Phases: start -> ``min_ready`` nodes ready; idle calls per second; a burst of ``nodes``
    one-node requests submitted at once (latency per request, then until min-ready is
    replenished: calls / servers launched); release them all (calls / servers deleted)."""
    try:
        from fixtures.launcher import LauncherEnv
        from nodepool.store import open_store  # noqa: F401
    except ImportError as exc:
        print(f"launcher figures skipped: {exc}")
        return
    import pathlib
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-openstack-launcher-"))
    env = LauncherEnv(tmp)
    provider = f"bench-launcher-{os.getpid()}"
    env.write(f"""
        labels:
          - name: small
            min-ready: {min_ready}
        providers:
          - name: {provider}
            driver: openstack
            cloud: local
            rate: 0.001
            cloud-images:
              - name: cirros
            pools:
              - name: main
                max-servers: {nodes + min_ready}
                networks: [private]
                auto-floating-ip: false
                host-key-checking: false
                labels:
                  - name: small
                    cloud-image: cirros
                    min-ram: 512
        """)

    def calls():
        worker = launcher.workers.get(provider)
        return worker.adapter.rate_limiter.calls if worker is not None else 0

    def ready_spares():
        return [n for n in client.store.list_nodes()
                if str(n.state) == "ready" and not n.allocated_to]

    try:
        t0 = time.monotonic()
        # production intervals (the Launcher's defaults), not the tests' short ones
        launcher = env.start_launcher(loop_interval=1.0, cleanup_interval=1.0,
                                      leak_interval=60.0, worker_tick=0.05)
        client = env.client()
        wait_for(lambda: len(ready_spares()) >= min_ready, 300, "min-ready")
        print(f"launcher start to min-ready ({min_ready} nodes): {time.monotonic() - t0:.1f} s "
              f"({calls()} API calls)")

        c0 = calls()
        time.sleep(10)
        idle_rate = (calls() - c0) / 10
        print(f"idle launcher: {idle_rate:.2f} API calls/s (server/floating-IP lists, quota, "
              f"leak scan)")

        known = {n.id for n in client.store.list_nodes()}
        c0 = calls()
        t0 = time.monotonic()
        submitted = {client.submit(["small"]).id: None for _ in range(nodes)}
        while None in submitted.values():
            for req_id, seen in submitted.items():
                if seen is None and str(client.store.get_request(req_id).state) in (
                        "fulfilled", "failed"):
                    submitted[req_id] = time.monotonic() - t0
            if time.monotonic() - t0 > 600:
                raise TimeoutError("burst not fulfilled within 600 s")
            time.sleep(0.1)
        latencies = sorted(submitted.values())
        failed = [r for r in submitted if str(client.store.get_request(r).state) == "failed"]
        print(f"{nodes}-request burst ({min_ready} served from min-ready): first fulfilled "
              f"after {latencies[0]:.1f} s, median {latencies[len(latencies) // 2]:.1f} s, "
              f"all after {latencies[-1]:.1f} s; failed: {len(failed)}")
        held = [client.accept(client.store.get_request(r)) for r in submitted if r not in failed]
        wait_for(lambda: len(ready_spares()) >= min_ready, 300, "min-ready replenished")
        window = time.monotonic() - t0
        launched = len({n.id for n in client.store.list_nodes()} - known)
        launch_calls = calls() - c0
        print(f"launch: {launched} servers in {window:.1f} s, {launch_calls} API calls = "
              f"{launch_calls / launched:.2f} per server launched (idle share "
              f"{idle_rate * window / launched:.2f})")

        doomed = {n.external_id for nodes_ in held for n in nodes_}
        c0 = calls()
        t0 = time.monotonic()
        for nodes_ in held:
            client.release(nodes_)
        conn = env.adapter(provider).connection()
        wait_for(lambda: not doomed & {s.id for s in conn.compute.servers()}, 300,
                 "released servers deleted", interval=0.5)
        gone_after = time.monotonic() - t0
        wait_for(lambda: not [n for n in client.store.list_nodes()
                              if n.external_id in doomed], 120, "node records removed")
        delete_calls = calls() - c0
        window = time.monotonic() - t0
        print(f"delete: {len(doomed)} servers gone from the cloud {gone_after:.1f} s after "
              f"release, {delete_calls} API calls = {delete_calls / len(doomed):.2f} per server "
              f"deleted (idle share {idle_rate * window / len(doomed):.2f})")
    except Exception as exc:
        print(f"launcher figures failed: {type(exc).__name__}: {exc}")
    finally:
        env.close()
        leftovers = [s for s in env.adapter(provider).connection().compute.servers(details=True)
                     if (s.metadata or {}).get("nodepool_provider_name") == provider]
        for server in leftovers:
            env.adapter(provider).connection().compute.delete_server(server,
                                                                     ignore_missing=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20, help="size of the request burst")
    parser.add_argument("--min-ready", type=int, default=5)
    parser.add_argument("--skip-adapter", action="store_true", help="launcher figures only")
    args = parser.parse_args()
    clouds_yaml, stop = ensure_cloud()
    os.environ["OS_CLIENT_CONFIG_FILE"] = clouds_yaml
    import warnings
    warnings.simplefilter("ignore")         # openstacksdk deprecation noise
    import openstack
    restore_quota = raise_quota(openstack.connect(cloud="local"),
                                instances=2 * (args.nodes + args.min_ready),
                                cores=4 * (args.nodes + args.min_ready), ram=512000)
    try:
        if not args.skip_adapter:
            adapter_burst(args.nodes // 2, floating_ips=False)
            adapter_burst(args.nodes // 2, floating_ips=True)
        launcher_figures(args.nodes, args.min_ready)
    finally:
        restore_quota()
        stop()


if __name__ == "__main__":
    main()
