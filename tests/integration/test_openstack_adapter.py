"""The OpenStack adapter against the real local cloud (tests/fixtures/openstack.py).

Config objects are built here with the driver's own schemas filling the defaults, so these tests
need neither the config loader nor a store.
"""
import time

import pytest
import voluptuous as v

from nodepool.config.model import CloudImage, Pool, PoolLabel, Provider, ProviderDiskImage
from nodepool.drivers.base import (META_BUILD_ID, META_NODE_ID, META_POOL, META_PROVIDER,
                                   META_UPLOAD_ID, ImageUploadSpec, LaunchSpec)
from nodepool.drivers.openstack import DRIVER
from nodepool.errors import (LabelConfigurationError, PermanentCloudError, QuotaError)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("openstack")]


def _opts(schema, values):
    return v.Schema(schema, extra=v.ALLOW_EXTRA)(dict(values))


def make_provider(name, cloud="local", pool=None, label=None, provider=None,
                  diskimage=False):
    """A Provider with one pool ``main`` and one label ``small`` (cloud image ``cirros``)."""
    popts = _opts(DRIVER.provider_schema(), dict({"cloud": cloud}, **(provider or {})))
    prov = Provider(name=name, driver="openstack", rate=0.001, options=popts)
    prov.cloud_images["cirros"] = CloudImage(name="cirros", options=_opts(
        DRIVER.cloud_image_schema(), {}))
    prov.diskimages["built"] = ProviderDiskImage(name="built", options=_opts(
        DRIVER.diskimage_schema(), {}))
    pl = Pool(name="main", provider=name,
              options=_opts(DRIVER.pool_schema(), dict({"networks": ["private"]},
                                                        **(pool or {}))))
    lopts = _opts(DRIVER.label_schema(), dict({"min-ram": 512}, **(label or {})))
    lbl = PoolLabel(name="small", pool="main", provider=name,
                    diskimage="built" if diskimage else None,
                    cloud_image=None if diskimage else "cirros", options=lopts)
    pl.labels["small"] = lbl
    prov.pools["main"] = pl
    return prov


def spec_for(prov, node_id, image_external_id=None):
    pool = prov.pools["main"]
    return LaunchSpec(hostname=f"np{node_id}", label=pool.labels["small"], pool=pool,
                      metadata={META_NODE_ID: node_id, META_POOL: "main",
                                META_PROVIDER: prov.name},
                      image_external_id=image_external_id, node_id=node_id)


def run(machine, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = machine.advance()
        if result is not None and result is not False:
            return result
        time.sleep(0.1)
    raise AssertionError(f"state machine stuck in {machine.state!r}")


def test_launch_floating_ip_metadata_and_delete(openstack_cloud, openstack_provider):
    prov = make_provider(openstack_provider, label={
        "instance-properties": {"team": "ci"},
        "dynamic-instance-properties": {"req": "{request.id}"}})
    adapter = DRIVER.adapter(prov)
    adapter.start()
    assert adapter.rate_limiter.interval == pytest.approx(0.001)
    inst = run(adapter.create_state_machine(spec_for(prov, "0000000001")))
    assert inst.ready and inst.external_id
    assert inst.private_ipv4.startswith("10.1.")
    assert inst.public_ipv4.startswith("172.24.4.")
    assert inst.interface_ip == inst.public_ipv4
    assert inst.metadata[META_NODE_ID] == "0000000001"
    assert inst.metadata["groups"] == f"{openstack_provider},cirros,small"
    assert inst.metadata["team"] == "ci"
    assert inst.metadata["req"] == "None"
    listed = {i.external_id: i for i in adapter.list_instances()}
    assert listed[inst.external_id].node_id == "0000000001"
    assert listed[inst.external_id].resources["ram"] == 512
    conn = openstack_cloud.admin()
    assert [f for f in conn.network.ips() if f.floating_ip_address == inst.public_ipv4]
    assert "FAKE CONSOLE" in adapter.console_log(inst.external_id)

    assert run(adapter.delete_state_machine(inst.external_id)) is True
    assert not openstack_cloud.servers_of(openstack_provider)
    assert not [f for f in conn.network.ips() if f.floating_ip_address == inst.public_ipv4]
    # deleting again is not an error
    assert run(adapter.delete_state_machine(inst.external_id)) is True


def test_one_listing_serves_many_machines(openstack_cloud, openstack_provider):
    prov = make_provider(openstack_provider, pool={"auto-floating-ip": False})
    adapter = DRIVER.adapter(prov)
    machines = [adapter.create_state_machine(spec_for(prov, f"00000000{i:02d}"))
                for i in range(3)]
    for m in machines:
        m.advance()          # create
    calls_before = adapter.rate_limiter.calls
    results = {}
    rounds = 0
    deadline = time.monotonic() + 90
    while len(results) < 3 and time.monotonic() < deadline:
        rounds += 1
        for m in machines:
            if m not in results:
                r = m.advance()
                if r is not None:
                    results[m] = r
        time.sleep(0.2)
    assert len(results) == 3
    assert all(r.public_ipv4 is None and r.interface_ip == r.private_ipv4
               for r in results.values())
    # a listing per round at most (TTL 1 s), never one GET per server per round
    assert adapter.rate_limiter.calls - calls_before <= rounds + 1
    deletes = [adapter.delete_state_machine(r.external_id) for r in results.values()]
    for d in deletes:
        run(d)


def test_quota_flavors_and_label_errors(openstack_cloud, openstack_provider):
    prov = make_provider(openstack_provider, label={"min-ram": 1000})
    adapter = DRIVER.adapter(prov)
    limits = adapter.quota_limits()
    assert limits["instances"] >= 1 and limits["cores"] >= 1 and limits["ram"] >= 512
    assert "volumes" not in limits          # no cinder in this cloud
    need = adapter.quota_for_label(prov.pools["main"].labels["small"])
    assert need == {"instances": 1, "cores": 1, "ram": 1024}       # m1.small
    both = make_provider(openstack_provider, label={"min-ram": 1000, "flavor-name": "medium"})
    assert DRIVER.adapter(both).quota_for_label(
        both.pools["main"].labels["small"])["ram"] == 2048
    by_name = make_provider(openstack_provider, label={"flavor-name": "m1.large"})
    by_name.pools["main"].labels["small"].options.pop("min-ram")
    assert DRIVER.adapter(by_name).quota_for_label(
        by_name.pools["main"].labels["small"])["cores"] == 4
    bad = make_provider(openstack_provider, label={"min-ram": 999999})
    with pytest.raises(LabelConfigurationError, match="no flavor matches min-ram 999999"):
        DRIVER.adapter(bad).quota_for_label(bad.pools["main"].labels["small"])
    assert adapter.label_ready(prov.pools["main"].labels["small"])
    missing = make_provider(openstack_provider)
    missing.cloud_images["cirros"].options["image-name"] = "no-such-image"
    assert not DRIVER.adapter(missing).label_ready(missing.pools["main"].labels["small"])


def test_unknown_network_is_a_clear_error(openstack_cloud, openstack_provider):
    prov = make_provider(openstack_provider, pool={"networks": ["nope"]})
    machine = DRIVER.adapter(prov).create_state_machine(spec_for(prov, "0000000009"))
    with pytest.raises(PermanentCloudError, match=f"provider {openstack_provider}.*network "
                                                  f"'nope' not found"):
        machine.advance()


def test_bad_credentials_and_unknown_cloud(openstack_cloud, openstack_provider, tmp_path,
                                           monkeypatch):
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text(open(openstack_cloud.clouds_yaml).read().replace(
        "password: secret", "password: wrong"))
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(clouds))
    prov = make_provider(openstack_provider)
    with pytest.raises(PermanentCloudError, match="not authorised"):
        DRIVER.adapter(prov).quota_limits()
    nope = make_provider(openstack_provider, cloud="no-such-cloud")
    with pytest.raises(PermanentCloudError, match="no-such-cloud"):
        DRIVER.adapter(nope).start()


def test_cloud_quota_refusal_is_quota_error(openstack_cloud, openstack_provider):
    conn = openstack_cloud.admin()
    project = conn.current_project_id
    before = conn.compute.get_quota_set(project).instances
    conn.compute.update_quota_set(project, instances=0)
    try:
        prov = make_provider(openstack_provider)
        machine = DRIVER.adapter(prov).create_state_machine(spec_for(prov, "0000000010"))
        with pytest.raises(QuotaError, match="(?i)quota exceeded"):
            machine.advance()
    finally:
        conn.compute.update_quota_set(project, instances=before)


def test_image_upload_boot_and_delete(openstack_cloud, openstack_provider, tmp_path):
    import subprocess
    image_file = tmp_path / "built.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image_file), "16M"],
                   check=True)
    prov = make_provider(openstack_provider, diskimage=True)
    adapter = DRIVER.adapter(prov)
    assert adapter.image_format() == "qcow2"
    meta = {META_BUILD_ID: "b1", META_UPLOAD_ID: "0000000001", META_PROVIDER: prov.name,
            "purpose": "test"}
    image_id = adapter.upload_image(ImageUploadSpec(
        image_name=f"{openstack_provider}-built-1", filename=str(image_file),
        image_format="qcow2", metadata=meta, timeout=120))
    try:
        listed = {r.id: r for r in adapter.list_images()}
        assert listed[image_id].metadata == {META_BUILD_ID: "b1", META_UPLOAD_ID: "0000000001",
                                             META_PROVIDER: prov.name}
        glance = openstack_cloud.admin().image.get_image(image_id)
        assert glance.disk_format == "qcow2" and glance.properties.get("purpose") == "test"
        inst = run(adapter.create_state_machine(spec_for(prov, "0000000020", image_id)))
        server = openstack_cloud.admin().compute.get_server(inst.external_id)
        assert server.image["id"] == image_id
        assert inst.metadata["groups"] == f"{openstack_provider},built,small"
        run(adapter.delete_state_machine(inst.external_id))
    finally:
        adapter.delete_image(image_id)
    assert image_id not in {r.id for r in adapter.list_images()}
    adapter.delete_image(image_id)       # missing image: not an error


def test_leaked_ports_and_floating_ips_are_listed(openstack_cloud, openstack_provider):
    conn = openstack_cloud.admin()
    net = conn.network.find_network("private")
    public = conn.network.find_network("public")
    port = conn.network.create_port(network_id=net.id, name=f"{openstack_provider}-leak",
                                    device_owner="compute:nova")
    fip = conn.network.create_ip(floating_network_id=public.id)
    try:
        prov = make_provider(openstack_provider, provider={"port-cleanup-interval": 1,
                                                           "clean-floating-ips": True})
        adapter = DRIVER.adapter(prov)
        first = {(r.type, r.id) for r in adapter.list_resources()}
        assert ("floatingip", fip.id) in first
        assert ("port", port.id) not in first     # seen DOWN once: not old enough yet
        time.sleep(1.1)
        resources = {(r.type, r.id): r for r in adapter.list_resources()}
        assert ("port", port.id) in resources
        assert resources[("port", port.id)].metadata == {META_PROVIDER: prov.name}
        for res in resources.values():
            if res.id in (port.id, fip.id):
                adapter.delete_resource(res)
        assert conn.network.find_port(port.id) is None
        assert conn.network.find_ip(fip.id) is None
    finally:
        conn.network.delete_port(port, ignore_missing=True)
        conn.network.delete_ip(fip, ignore_missing=True)


def test_nova_api_down_then_back(openstack_cloud, openstack_provider):
    from nodepool.errors import TransientCloudError
    prov = make_provider(openstack_provider, pool={"auto-floating-ip": False})
    adapter = DRIVER.adapter(prov)
    adapter.start()
    adapter.flavor_for(prov.pools["main"].labels["small"])      # warm the memo
    openstack_cloud.stop_service("nova-api")
    try:
        with pytest.raises(TransientCloudError, match=f"provider {openstack_provider}"):
            adapter.create_state_machine(spec_for(prov, "0000000030")).advance()
        with pytest.raises(TransientCloudError):
            adapter.list_instances()
    finally:
        openstack_cloud.start_service("nova-api")
    deadline = time.monotonic() + 90
    while True:
        try:
            adapter.quota_limits()
            break
        except TransientCloudError:
            assert time.monotonic() < deadline, "nova-api did not come back"
            time.sleep(1)
    inst = run(adapter.create_state_machine(spec_for(prov, "0000000031")))
    run(adapter.delete_state_machine(inst.external_id))


def test_create_whose_answer_was_lost_is_found_by_the_next_attempt(openstack_cloud,
                                                                   openstack_provider):
    """Nova made the server but its answer never arrived (read timeout): the launcher's next
    attempt must use that server, not boot a second one for the same node."""
    from nodepool.errors import TransientCloudError
    prov = make_provider(openstack_provider, pool={"auto-floating-ip": False})
    adapter = DRIVER.adapter(prov)
    adapter.start()
    real_call = adapter.call

    def answer_lost(what, func, *args, **kwargs):
        result = real_call(what, func, *args, **kwargs)
        if "create server" in what:
            raise TransientCloudError(f"{what}: read timeout")
        return result

    adapter.call = answer_lost
    with pytest.raises(TransientCloudError, match="read timeout"):
        adapter.create_state_machine(spec_for(prov, "0000000040")).advance()
    adapter.call = real_call
    inst = run(adapter.create_state_machine(spec_for(prov, "0000000040")))
    servers = adapter.call("list", lambda c: list(c.compute.servers(name="^np0000000040$")))
    try:
        assert [s.id for s in servers] == [inst.external_id]
    finally:
        for server in servers:
            run(adapter.delete_state_machine(server.id))
