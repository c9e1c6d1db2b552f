"""The simulated driver against a real SQLite state file in tmp_path (no mocks).

Boot and delete progress are driven by a fake wall clock set on the cloud object, so "not ready
yet" and "ready now" are exact; the few real-time paths wait with generous timeouts.
"""
import base64
import ipaddress
import multiprocessing
import time

import pytest
import voluptuous as v

from nodepool.config.model import CloudImage, Pool, PoolLabel, Provider
from nodepool.drivers import get_driver
from nodepool.drivers.base import (META_BUILD_ID, META_NODE_ID, META_POOL, META_PROVIDER,
                                   META_UPLOAD_ID, CloudResource, ImageUploadSpec, LaunchSpec)
from nodepool.drivers.simulated import DRIVER
from nodepool.drivers.simulated import cloud as simcloud
from nodepool.drivers.simulated.adapter import (DEFAULT_AZS, SimulatedAdapter,
                                                list_interval_for)
from nodepool.errors import (InstanceNotFound, PermanentCloudError, QuotaError,
                             TransientCloudError)
from nodepool.model.quota import Limits, Resources


def make_provider(state_file, name="sim", rate=0, **options):
    """A Provider as the config loader would build it (driver schema defaults filled in)."""
    raw = {key.replace("_", "-"): value for key, value in options.items()}
    raw["state-file"] = str(state_file)
    opts = v.Schema(DRIVER.provider_schema())(raw)
    image_schema = v.Schema(DRIVER.cloud_image_schema())
    label_schema = v.Schema(DRIVER.label_schema())
    images = {"img": CloudImage(name="img", options=image_schema({"image-id": "debian-12"})),
              "gone": CloudImage(name="gone", options=image_schema({"exists": False}))}
    labels = {
        "small": PoolLabel("small", "main", name, cloud_image="img", options=label_schema({})),
        "big": PoolLabel("big", "main", name, cloud_image="img",
                         options=label_schema({"cores": 4, "ram": 8192})),
        "broken": PoolLabel("broken", "main", name, cloud_image="gone",
                            options=label_schema({})),
        "built": PoolLabel("built", "main", name, diskimage="debian", options=label_schema({})),
    }
    pool = Pool(name="main", provider=name, labels=labels)
    return Provider(name=name, driver="simulated", rate=rate, pools={"main": pool},
                    cloud_images=images, options=opts)


class FakeClock:
    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self):
        return self.now


def adapter_for(tmp_path, clock=None, **options):
    adapter = get_driver("simulated").adapter(make_provider(tmp_path / "cloud.json", **options))
    if clock is not None:
        adapter.cloud.clock = clock
    adapter.list_interval = 0          # every waiting advance reads a fresh listing
    return adapter


def spec_for(adapter, label="small", node_id="0000000001", **kw):
    pool = adapter.provider.pools["main"]
    metadata = {META_NODE_ID: node_id, META_POOL: "main", META_PROVIDER: adapter.provider.name}
    return LaunchSpec(hostname=f"np{node_id}", label=pool.labels[label], pool=pool,
                      metadata=metadata, node_id=node_id, **kw)


def run_to_end(machine, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = machine.advance()
        if result is not None:
            return result
        time.sleep(0.01)
    raise AssertionError(f"state machine {machine} did not finish in {timeout}s")


# -- launch --------------------------------------------------------------------------------------

def test_instance_becomes_ready_boot_time_after_create(tmp_path):
    clock = FakeClock()
    adapter = adapter_for(tmp_path, clock, boot_time=30)
    sm = adapter.create_state_machine(spec_for(adapter))
    assert sm.advance() is None
    assert sm.external_id.startswith("sim-") and adapter.api_calls == {"create": 1}
    assert sm.advance() is None
    clock.now += 29.9
    assert sm.advance() is None and not sm.complete
    clock.now += 0.1
    inst = sm.advance()
    assert sm.complete and inst.ready and not inst.failed and not inst.deleted
    assert adapter.api_calls == {"create": 1, "list": 3}       # one API call per advance
    assert inst.external_id == sm.external_id
    assert inst.metadata[META_NODE_ID] == "0000000001" and inst.node_id == "0000000001"
    assert inst.cloud == "simulated" and inst.region and inst.az in DEFAULT_AZS
    assert inst.resources == Resources.of(instances=1, cores=1, ram=1024)
    assert ipaddress.ip_address(inst.private_ipv4) in ipaddress.ip_network("192.0.2.0/24")
    assert ipaddress.ip_address(inst.public_ipv4) in ipaddress.ip_network("203.0.113.0/24")
    assert ipaddress.ip_address(inst.public_ipv6) in ipaddress.ip_network("2001:db8::/32")
    assert inst.interface_ip == inst.public_ipv4
    key_type, blob = inst.host_keys[0].split()
    raw = base64.b64decode(blob)
    assert key_type == "ssh-ed25519" and raw[4:15] == b"ssh-ed25519" and len(raw) == 51


def test_requested_az_and_label_size_are_used(tmp_path):
    adapter = adapter_for(tmp_path, boot_time=0)
    inst = run_to_end(adapter.create_state_machine(spec_for(adapter, label="big", az="zone-9")))
    assert inst.az == "zone-9" and inst.resources == Resources.of(1, cores=4, ram=8192)


@pytest.mark.slow
def test_instance_becomes_ready_on_the_real_clock(tmp_path):
    adapter = get_driver("simulated").adapter(make_provider(tmp_path / "c.json", boot_time=0.2))
    adapter.start()
    sm = adapter.create_state_machine(spec_for(adapter))
    inst = run_to_end(sm)
    assert inst.ready and adapter.cloud.get_instance(sm.external_id).status == simcloud.ACTIVE
    adapter.stop()


def test_many_waiting_launches_share_one_listing(tmp_path):
    clock = FakeClock()
    adapter = adapter_for(tmp_path, clock, boot_time=10)
    adapter.list_interval = 3600
    machines = [adapter.create_state_machine(spec_for(adapter, node_id=f"{i:010d}"))
                for i in range(10)]
    for sm in machines:
        assert sm.advance() is None
    for _ in range(3):
        assert all(sm.advance() is None for sm in machines)
    assert adapter.api_calls == {"create": 10, "list": 1}
    clock.now += 10
    adapter.list_interval = 0.0
    assert machines[0].advance().ready                       # one fresh listing...
    adapter.list_interval = 3600
    assert all(sm.advance().ready for sm in machines[1:])    # ...serves everyone
    assert adapter.api_calls == {"create": 10, "list": 2}


def test_missing_cloud_image_is_a_permanent_error_without_an_api_call(tmp_path):
    adapter = adapter_for(tmp_path)
    assert adapter.label_ready(adapter.provider.pools["main"].labels["broken"]) is False
    assert adapter.label_ready(adapter.provider.pools["main"].labels["small"]) is True
    sm = adapter.create_state_machine(spec_for(adapter, label="broken"))
    with pytest.raises(PermanentCloudError, match="cloud image gone .*does not exist"):
        sm.advance()
    assert sm.external_id is None and not adapter.api_calls


def test_boot_failure_goes_to_error_and_the_instance_stays_until_deleted(tmp_path):
    adapter = adapter_for(tmp_path, boot_time=0, boot_failure_rate=1.0, seed=7)
    sm = adapter.create_state_machine(spec_for(adapter))
    with pytest.raises(PermanentCloudError, match="went to ERROR"):
        run_to_end(sm)
    assert sm.external_id
    [inst] = adapter.list_instances()
    assert inst.failed and not inst.ready and inst.external_id == sm.external_id
    assert "Kernel panic" in adapter.console_log(sm.external_id)
    assert run_to_end(adapter.delete_state_machine(sm.external_id)) is True
    assert adapter.list_instances() == []


def test_api_errors_at_rate_one_raise_transient_errors_and_change_nothing(tmp_path):
    adapter = adapter_for(tmp_path, api_error_rate=1.0)
    with pytest.raises(TransientCloudError, match="sim: create failed: 503"):
        adapter.create_state_machine(spec_for(adapter)).advance()
    with pytest.raises(TransientCloudError, match="list failed"):
        adapter.list_instances()
    with pytest.raises(TransientCloudError):
        adapter.delete_state_machine("sim-whatever").advance()
    assert adapter.cloud.list_instances() == []
    assert adapter.rate_limiter.calls == 3


def test_a_failed_shared_listing_delays_waiting_launches_instead_of_failing_them(tmp_path):
    clock = FakeClock()
    adapter = adapter_for(tmp_path, clock, boot_time=5)
    sm = adapter.create_state_machine(spec_for(adapter))
    assert sm.advance() is None
    clock.now += 5
    adapter.api_error_rate = 1.0
    assert sm.advance() is None and sm.advance() is None
    assert adapter.list_errors == 2 and not sm.complete
    adapter.api_error_rate = 0.0
    assert sm.advance().ready


def test_seed_makes_failures_repeatable(tmp_path):
    def outcomes(path):
        adapter = get_driver("simulated").adapter(make_provider(
            path, boot_time=0, boot_failure_rate=0.5, api_error_rate=0.3, seed=42))
        results = []
        for i in range(12):
            try:
                run_to_end(adapter.create_state_machine(spec_for(adapter, node_id=str(i))))
                results.append("ok")
            except Exception as exc:
                results.append(type(exc).__name__)
        return results

    first = outcomes(tmp_path / "a.json")
    assert first == outcomes(tmp_path / "b.json")
    assert {"ok", "PermanentCloudError", "TransientCloudError"} <= set(first)


# -- quota ---------------------------------------------------------------------------------------

def test_cloud_quota_refuses_creates_with_a_quota_error(tmp_path):
    clock = FakeClock()
    adapter = adapter_for(tmp_path, clock, boot_time=0, delete_time=5,
                          quota={"instances": 3, "cores": 6})
    assert adapter.quota_limits() == Limits(instances=3, cores=6)
    small = adapter.provider.pools["main"].labels["small"]
    assert adapter.quota_for_label(small) == Resources.of(1, cores=1, ram=1024)
    big = run_to_end(adapter.create_state_machine(spec_for(adapter, label="big")))
    with pytest.raises(QuotaError, match="Quota exceeded for cores: requested 4, 4 of 6"):
        adapter.create_state_machine(spec_for(adapter, label="big")).advance()
    run_to_end(adapter.create_state_machine(spec_for(adapter, node_id="2")))
    run_to_end(adapter.create_state_machine(spec_for(adapter, node_id="3")))
    with pytest.raises(QuotaError, match="instances: requested 1, 3 of 3"):
        adapter.create_state_machine(spec_for(adapter, node_id="4")).advance()
    # an instance being deleted still counts until it is gone
    delete = adapter.delete_state_machine(big.external_id)
    assert delete.advance() is None
    with pytest.raises(QuotaError):
        adapter.create_state_machine(spec_for(adapter, node_id="5")).advance()
    clock.now += 5
    assert delete.advance() is True
    run_to_end(adapter.create_state_machine(spec_for(adapter, node_id="5")))


def test_pure_quota_and_status_rules():
    limits = Limits(instances=2, ram=100)
    assert simcloud.quota_refusal(limits, Resources.of(1, 0, 50), Resources.of(1, 4, 50)) is None
    assert "ram" in simcloud.quota_refusal(limits, Resources.of(1, 0, 60),
                                           Resources.of(1, 4, 50))
    status = simcloud.instance_status
    assert status(ready_at=10, fails=0, delete_at=None, gone_at=None, now=9) == simcloud.BUILD
    assert status(ready_at=10, fails=0, delete_at=None, gone_at=None, now=10) == simcloud.ACTIVE
    assert status(ready_at=10, fails=1, delete_at=None, gone_at=None, now=11) == simcloud.ERROR
    assert status(ready_at=10, fails=0, delete_at=11, gone_at=12, now=11) == simcloud.DELETING
    assert status(ready_at=10, fails=0, delete_at=11, gone_at=12, now=12) == simcloud.GONE
    assert len({simcloud.addresses_for(n) for n in range(1, 600)}) == 599
    assert list_interval_for(boot_time=60, delete_time=0) == 0.5     # never staler than 0.5 s
    assert list_interval_for(boot_time=0.4, delete_time=0) == 0.1    # fast clouds poll faster
    assert list_interval_for(boot_time=0, delete_time=0) == 0.1


# -- delete --------------------------------------------------------------------------------------

def test_delete_takes_delete_time_and_missing_is_success(tmp_path):
    clock = FakeClock()
    adapter = adapter_for(tmp_path, clock, boot_time=0, delete_time=3)
    inst = run_to_end(adapter.create_state_machine(spec_for(adapter)))
    sm = adapter.delete_state_machine(inst.external_id)
    assert sm.advance() is None and sm.advance() is None
    [listed] = adapter.list_instances()
    assert listed.deleted and not listed.ready
    clock.now += 3
    assert sm.advance() is True and sm.complete
    assert adapter.list_instances() == []
    assert adapter.delete_state_machine(inst.external_id).advance() is True
    assert adapter.delete_state_machine("sim-never-existed").advance() is True


# -- persistence and concurrency -----------------------------------------------------------------

def test_instances_survive_a_new_adapter_object(tmp_path):
    first = adapter_for(tmp_path, boot_time=0)
    inst = run_to_end(first.create_state_machine(spec_for(first)))
    first.stop()
    second = adapter_for(tmp_path, boot_time=0)
    second.start()
    [seen] = second.list_instances()
    assert seen.external_id == inst.external_id and seen.ready
    assert seen.metadata == inst.metadata and seen.public_ipv4 == inst.public_ipv4
    assert run_to_end(second.delete_state_machine(inst.external_id))
    assert first.list_instances() == []


def _create_in_child(state_file, prefix, count, go, results):
    """Runs in a spawned process: another launcher sharing the cloud account."""
    adapter = SimulatedAdapter(make_provider(state_file, boot_time=0, api_latency=0.001,
                                             quota={"instances": 60}))
    adapter.start()
    go.wait(60)                    # both processes start creating together
    created, refused = 0, 0
    for i in range(count):
        spec = spec_for(adapter, node_id=f"{prefix}{i:04d}")
        try:
            adapter.create_state_machine(spec).advance()
            created += 1
        except QuotaError:
            refused += 1
    adapter.stop()
    results.put((prefix, created, refused))


def test_two_processes_share_one_state_file_without_corruption_or_overshoot(tmp_path):
    state_file = tmp_path / "cloud.json"
    ctx = multiprocessing.get_context("spawn")
    results, go = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_create_in_child, args=(str(state_file), p, 40, go, results))
             for p in ("1", "2")]
    for proc in procs:
        proc.start()
    try:
        outcome = sorted(results.get(timeout=60) for _ in procs)
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    assert [p.exitcode for p in procs] == [0, 0]
    assert sum(created for _, created, _ in outcome) == 60          # quota 60 held exactly
    assert sum(refused for _, _, refused in outcome) == 20
    instances = adapter_for(tmp_path).list_instances()
    assert len(instances) == 60
    assert len({i.external_id for i in instances}) == 60
    assert len({i.public_ipv4 for i in instances}) == 60
    node_ids = {i.node_id for i in instances}
    assert len(node_ids) == 60 and {n[0] for n in node_ids} == {"1", "2"}


def test_unusable_state_file_is_a_clear_cloud_error(tmp_path):
    bad = tmp_path / "cloud.json"
    bad.write_text('{"instances": []}\n' * 200)
    adapter = get_driver("simulated").adapter(make_provider(bad))
    with pytest.raises(PermanentCloudError, match=f"state file {bad}"):
        adapter.start()


# -- foreign instances and console ---------------------------------------------------------------

def test_foreign_instances_are_listed_with_their_cost(tmp_path):
    adapter = adapter_for(tmp_path)
    untagged = adapter.cloud.add_instance("ci-runner", cores=2, ram=2048)
    other = adapter.cloud.add_instance(metadata={META_PROVIDER: "elsewhere", META_NODE_ID: "5"},
                                       ready=False)
    by_id = {i.external_id: i for i in adapter.list_instances()}
    assert by_id[untagged.id].metadata == {} and by_id[untagged.id].ready
    assert by_id[untagged.id].resources == Resources.of(1, cores=2, ram=2048)
    assert by_id[other.id].provider_name == "elsewhere" and not by_id[other.id].ready
    adapter.cloud.update_instance(other.id, metadata={}, fails=True, ready_at=0)
    assert adapter.cloud.get_instance(other.id).status == simcloud.ERROR
    assert adapter.cloud.usage() == Resources.of(2, cores=3, ram=3072)


def test_listings_follow_changes_and_hand_out_independent_copies(tmp_path):
    """Repeated listings of an unchanged fleet reuse their parsing, yet every change shows
    (status moving with the clock, metadata, deletes) and nothing a caller changes leaks into
    the next listing."""
    clock = FakeClock()
    adapter = adapter_for(tmp_path, clock, delete_time=5)
    booting = adapter.cloud.add_instance("a", metadata={META_PROVIDER: "sim"}, ready=False)
    kept = adapter.cloud.add_instance("b", metadata={META_PROVIDER: "sim", META_NODE_ID: "1"})
    first = {i.external_id: i for i in adapter.list_instances()}
    assert not first[booting.id].ready and first[kept.id].ready
    first[kept.id].metadata[META_NODE_ID] = "changed by a caller"
    first[kept.id].host_keys.append("not the cloud's")
    first[kept.id].resources["cores"] = 99
    shared = {i.id: i for i in adapter.cloud.list_instances(shared=True)}
    copies = {i.id: i for i in adapter.cloud.list_instances()}
    copies[kept.id].metadata["x"] = "y"
    assert adapter.cloud.list_instances(shared=True)[1] is shared[kept.id]
    assert shared[kept.id].metadata == {META_PROVIDER: "sim", META_NODE_ID: "1"}
    clock.now += 3600                                 # "a" finishes booting
    adapter.cloud.update_instance(kept.id, metadata={META_PROVIDER: "sim", META_NODE_ID: "2"})
    second = {i.external_id: i for i in adapter.list_instances()}
    assert second[booting.id].ready
    assert second[kept.id].node_id == "2" and len(second[kept.id].host_keys) == 1
    assert second[kept.id].resources == Resources.of(instances=1, cores=1, ram=1024)
    adapter.cloud.delete_instance(booting.id)
    third = {i.external_id: i for i in adapter.list_instances()}
    assert third[booting.id].deleted and third[kept.id] == second[kept.id]
    assert third[kept.id] is not second[kept.id]


def test_console_log(tmp_path):
    adapter = adapter_for(tmp_path, boot_time=0)
    inst = run_to_end(adapter.create_state_machine(spec_for(adapter)))
    log = adapter.console_log(inst.external_id)
    assert "np0000000001 login:" in log and inst.private_ipv4 in log
    with pytest.raises(InstanceNotFound, match="sim-missing"):
        adapter.console_log("sim-missing")


# -- images --------------------------------------------------------------------------------------

def upload_spec(path, **kw):
    meta = {META_BUILD_ID: "0000000007", META_UPLOAD_ID: "0000000001", META_PROVIDER: "sim"}
    return ImageUploadSpec(image_name="debian-1700000000", filename=str(path),
                           image_format="qcow2", metadata=meta, **kw)


def test_image_upload_list_boot_and_delete(tmp_path):
    adapter = adapter_for(tmp_path, boot_time=0)
    image_file = tmp_path / "debian.qcow2"
    image_file.write_bytes(b"QFI\xfb" + b"\0" * 4096)
    image_id = adapter.upload_image(upload_spec(image_file))
    assert image_id.startswith("sim-img-")
    stored = adapter.cloud.get_image(image_id)
    assert stored.status == simcloud.IMAGE_ACTIVE and stored.size == 4100
    assert stored.format == "qcow2" and stored.name == "debian-1700000000"
    assert len(stored.sha256) == 64
    adapter.cloud.create_image("someone-elses", image_format="raw", size=1, md5=None,
                               sha256=None, metadata={"owner": "ops"})
    [listed] = adapter.list_images()
    assert listed == CloudResource(type="image", id=image_id, name="debian-1700000000",
                                   metadata=upload_spec(image_file).metadata)
    assert adapter.list_resources() == [listed]

    inst = run_to_end(adapter.create_state_machine(
        spec_for(adapter, label="built", image_external_id=image_id)))
    assert inst.ready and adapter.cloud.get_instance(inst.external_id).image_id == image_id

    adapter.delete_resource(listed)
    assert adapter.list_images() == []
    adapter.delete_image(image_id)                       # already gone: no error
    with pytest.raises(PermanentCloudError, match=f"image {image_id} not found"):
        adapter.create_state_machine(
            spec_for(adapter, label="built", image_external_id=image_id)).advance()


def test_upload_refuses_missing_empty_or_corrupt_files(tmp_path):
    adapter = adapter_for(tmp_path)
    with pytest.raises(PermanentCloudError, match="cannot read .*nope.qcow2"):
        adapter.upload_image(upload_spec(tmp_path / "nope.qcow2"))
    empty = tmp_path / "empty.qcow2"
    empty.write_bytes(b"")
    with pytest.raises(PermanentCloudError, match="empty.qcow2 is empty"):
        adapter.upload_image(upload_spec(empty))
    data = tmp_path / "data.qcow2"
    data.write_bytes(b"x" * 10)
    with pytest.raises(PermanentCloudError, match="md5 of .* expected 0000"):
        adapter.upload_image(upload_spec(data, md5="0000"))
    assert adapter.cloud.list_images() == []


# -- metrics ---------------------------------------------------------------------------------------

def test_api_calls_are_counted_in_the_metrics_endpoint(tmp_path):
    """nodepool_api_calls_total{provider, operation} as /metrics serves it moves with every
    call the adapter makes (the registry is process-wide: compare before and after)."""
    import re
    import urllib.request
    from nodepool.store.sqlite import SQLiteStore
    from nodepool.web.app import StatusWebApp

    def scrape():
        with urllib.request.urlopen(f"http://127.0.0.1:{app.port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        counts = {}
        for op, value in re.findall(r'^nodepool_api_calls_total\{operation="([^"]+)",'
                                    r'provider="metrics-sim"\} ([0-9.e+]+)$', text, re.M):
            counts[op] = float(value)
        return counts

    store = SQLiteStore(tmp_path / "state.sqlite").start()
    app = StatusWebApp(store, lambda: None, 0, "127.0.0.1")
    app.start()
    try:
        before = scrape()
        adapter = adapter_for(tmp_path, FakeClock(), name="metrics-sim", boot_time=0)
        run_to_end(adapter.create_state_machine(spec_for(adapter)))
        adapter.list_images()
        after = scrape()
    finally:
        app.stop()
        store.stop()
    moved = {op: after[op] - before.get(op, 0) for op in after}
    assert moved == {op: float(n) for op, n in adapter.api_calls.items()}
    assert moved["create"] == 1 and moved["list images"] == 1


def test_api_calls_of_every_adapter_add_up_in_the_state_file_when_counted(tmp_path):
    counted = adapter_for(tmp_path, count_api_calls=True, api_error_rate=0.5, seed=3)
    other = adapter_for(tmp_path, count_api_calls=True)
    quiet = adapter_for(tmp_path)                      # counting is off by default
    failures = 0
    for _ in range(20):
        try:
            counted.list_instances()
        except TransientCloudError:
            failures += 1
    run_to_end(other.create_state_machine(spec_for(other)))
    quiet.list_instances()
    counts = counted.cloud.api_call_counts()
    assert 0 < failures < 20
    assert counts["list"][0] == 20 + other.api_calls["list"]
    assert counts["list"][1] == failures
    assert counts["create"] == (1, 0)
    assert quiet.api_calls == {"list": 1}
