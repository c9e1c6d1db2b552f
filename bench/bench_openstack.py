"""OpenStack driver benchmark against the real local cloud (prints figures, asserts nothing).

    python bench/bench_openstack.py [--nodes 20]

Uses the cloud named by ``NODEPOOL_OPENSTACK_CLOUDS_YAML`` (cloud ``local``) or starts one with
``tests/fixtures/openstack/cloud.sh`` in a temp dir (root, ~45 s) and stops it afterwards.

Figures:
* adapter burst: N launches advanced from one loop (as a provider worker does): seconds until
  all are ACTIVE, seconds until all are deleted, API calls per node launched and deleted (the
  rate limiter's ``calls``), with and without floating IPs;
* launcher (when the embedded store is available): seconds from launcher start to min-ready,
  and latency of an N-request burst.
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


def ensure_cloud():
    """(clouds.yaml, stop function)."""
    reuse = os.environ.get("NODEPOOL_OPENSTACK_CLOUDS_YAML")
    if reuse:
        return reuse, lambda: None
    base = tempfile.mkdtemp(prefix="bench-openstack-")
    env = dict(os.environ, BASE=base)
    t0 = time.monotonic()
    subprocess.run([CLOUD_SH, "start"], env=env, check=True, stdout=subprocess.DEVNULL)
    print(f"cloud start: {time.monotonic() - t0:.1f} s")
    return os.path.join(base, "clouds.yaml"), lambda: subprocess.run(
        [CLOUD_SH, "stop"], env=env, stdout=subprocess.DEVNULL)


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
    while len(done) < nodes:
        for i, m in enumerate(machines):
            if i not in done:
                result = m.advance()
                if result is not None:
                    done[i] = result
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
        time.sleep(0.05)
    deleted = time.monotonic() - t0
    delete_calls = adapter.rate_limiter.calls - base_calls
    label = "with floating IPs" if floating_ips else "fixed IPs only"
    print(f"adapter burst of {nodes} ({label}): all ACTIVE in {launched:.1f} s, all deleted in "
          f"{deleted:.1f} s; API calls per node: launch {launch_calls / nodes:.2f}, "
          f"delete {delete_calls / nodes:.2f}")


def launcher_figures(nodes, clouds_yaml):
    try:
        from fixtures.launcher import LauncherEnv, wait_until
        from nodepool.store import open_store  # noqa: F401
    except ImportError as exc:
        print(f"launcher figures skipped: {exc}")
        return
    import pathlib
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-openstack-launcher-"))
    env = LauncherEnv(tmp)
    provider = f"bench-{os.getpid()}"
    env.write(f"""
        labels:
          - name: small
            min-ready: 5
        providers:
          - name: {provider}
            driver: openstack
            cloud: local
            rate: 0.001
            cloud-images:
              - name: cirros
            pools:
              - name: main
                max-servers: {nodes + 5}
                networks: [private]
                host-key-checking: false
                labels:
                  - name: small
                    cloud-image: cirros
                    min-ram: 512
        """)
    try:
        t0 = time.monotonic()
        launcher = env.start_launcher()
        client = env.client()
        wait_until(lambda: len([n for n in client.store.list_nodes()
                                if str(n.state) == "ready"]) >= 5, timeout=300,
                   message="min-ready")
        print(f"launcher start to min-ready (5 nodes): {time.monotonic() - t0:.1f} s")
        t0 = time.monotonic()
        submitted = [client.submit(["small"]) for _ in range(nodes)]
        latencies = []
        for req in submitted:
            done = client.wait(req.id, timeout=600)
            latencies.append(time.monotonic() - t0)
            client.release(client.accept(done))
        print(f"{nodes}-request burst: first fulfilled after {min(latencies):.1f} s, all after "
              f"{max(latencies):.1f} s")
        worker = launcher.workers.get(provider)
        if worker is not None:
            print(f"launcher API calls so far (rate limiter): {worker.adapter.rate_limiter.calls}")
    except Exception as exc:
        print(f"launcher figures failed: {type(exc).__name__}: {exc}")
    finally:
        env.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20)
    args = parser.parse_args()
    clouds_yaml, stop = ensure_cloud()
    os.environ["OS_CLIENT_CONFIG_FILE"] = clouds_yaml
    try:
        adapter_burst(args.nodes // 2, floating_ips=False)
        adapter_burst(args.nodes // 2, floating_ips=True)
        launcher_figures(args.nodes, clouds_yaml)
    finally:
        stop()


if __name__ == "__main__":
    main()
