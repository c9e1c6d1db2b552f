"""Pure parts of the OpenStack driver: flavor choice, address choice, error mapping, checks."""
from types import SimpleNamespace

import pytest

pytest.importorskip("openstack")

import keystoneauth1.exceptions as ks_exc  # noqa: E402
from openstack import exceptions as os_exc  # noqa: E402

from nodepool.config.model import CloudImage, Config, Pool, PoolLabel, Provider  # noqa: E402
from nodepool.drivers.openstack import DRIVER  # noqa: E402
from nodepool.drivers.openstack.addresses import classify_addresses  # noqa: E402
from nodepool.drivers.openstack.adapter import (Listing, server_metadata,  # noqa: E402
                                                translate_error)
from nodepool.drivers.openstack.flavors import choose_flavor  # noqa: E402
from nodepool.drivers.base import LaunchSpec  # noqa: E402
from nodepool.errors import (InstanceNotFound, PermanentCloudError, QuotaError,  # noqa: E402
                             TransientCloudError)
from nodepool.model.records import NodeRequest  # noqa: E402


def flavor(name, ram, id=None):
    return SimpleNamespace(name=name, ram=ram, id=id or f"id-{name}")


FLAVORS = [flavor("m1.large", 4096), flavor("m1.small", 1024), flavor("b.small", 1024),
           flavor("m1.tiny", 512)]


def test_flavor_by_min_ram_takes_smallest_then_name():
    assert choose_flavor(FLAVORS, min_ram=600).name == "b.small"
    assert choose_flavor(FLAVORS, min_ram=600, flavor_name="m1").name == "m1.small"
    assert choose_flavor(FLAVORS, min_ram=5000) is None


def test_flavor_by_name_is_exact_name_or_id():
    assert choose_flavor(FLAVORS, flavor_name="m1.tiny").ram == 512
    assert choose_flavor(FLAVORS, flavor_name="id-m1.large").ram == 4096
    assert choose_flavor(FLAVORS, flavor_name="m1") is None


def test_addresses_floating_fixed_and_external():
    addrs = {"private": [{"addr": "10.0.0.5", "version": 4, "OS-EXT-IPS:type": "fixed"},
                         {"addr": "172.24.4.9", "version": 4, "OS-EXT-IPS:type": "floating"},
                         {"addr": "fd00::5", "version": 6, "OS-EXT-IPS:type": "fixed"}],
             "public": [{"addr": "2001:db8:1::5", "version": 6}]}
    out = classify_addresses(addrs, {"public"})
    assert out == {"public_ipv4": "172.24.4.9", "private_ipv4": "10.0.0.5",
                   "public_ipv6": "2001:db8:1::5"}
    assert classify_addresses({"ext": [{"addr": "203.0.113.4", "version": 4}]},
                              {"ext"})["public_ipv4"] == "203.0.113.4"
    assert classify_addresses({}, set()) == {"public_ipv4": None, "private_ipv4": None,
                                             "public_ipv6": None}


@pytest.mark.parametrize("exc,cls", [
    (os_exc.HttpException("Quota exceeded for instances", http_status=403), QuotaError),
    (os_exc.HttpException("No valid host was found", http_status=500), QuotaError),
    (ks_exc.Unauthorized("bad password"), PermanentCloudError),
    (os_exc.NotFoundException("gone", http_status=404), InstanceNotFound),
    (ks_exc.ConnectFailure("refused"), TransientCloudError),
    (os_exc.HttpException("boom", http_status=503), TransientCloudError),
    (os_exc.BadRequestException("Invalid flavorRef", http_status=400), PermanentCloudError),
    (RuntimeError("odd"), TransientCloudError),
])
def test_errors_map_to_our_classes_and_name_the_subject(exc, cls):
    err = translate_error(exc, "provider p (cloud c): create server np1")
    assert type(err) is cls
    assert str(err).startswith("provider p (cloud c): create server np1")
    assert "\n" not in str(err)


def test_listing_is_shared_within_ttl_and_refreshed_after_a_mark():
    calls = []
    listing = Listing(lambda: calls.append(1) or len(calls), ttl=3600)
    assert listing.get() == 1 and listing.get() == 1
    import time
    mark = time.monotonic()
    assert listing.get(after=mark) == 2
    assert listing.get(after=mark) == 2
    listing.invalidate()
    assert listing.get() == 3


def test_server_metadata_groups_properties_and_dynamic():
    pool = Pool(name="main", provider="p")
    label = PoolLabel(name="small", pool="main", provider="p", cloud_image="cirros", options={
        "instance-properties": {"a": "1"},
        "dynamic-instance-properties": {"who": "{request.requestor}-{request.labels[0]}",
                                        "bad": "{request.nope}"}})
    request = NodeRequest(id="100-0000000001", node_types=["small"], requestor="zuul")
    spec = LaunchSpec(hostname="np1", label=label, pool=pool,
                      metadata={"nodepool_node_id": "0000000001"}, request=request)
    meta = server_metadata(spec, "p", "cirros")
    assert meta == {"a": "1", "who": "zuul-small", "groups": "p,cirros,small",
                    "nodepool_node_id": "0000000001"}


def test_check_provider_rules(tmp_path, monkeypatch):
    clouds = tmp_path / "clouds.yaml"
    clouds.write_text("clouds:\n  mine:\n    auth:\n      auth_url: http://127.0.0.1:1/v3\n"
                      "      username: u\n      password: p\n      project_name: x\n")
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(clouds))
    prov = Provider(name="p", driver="openstack", options={"cloud": "mine"})
    prov.cloud_images["c"] = CloudImage(name="c", options={"image-id": "1", "image-name": "x"})
    pool = Pool(name="main", provider="p")
    pool.labels["ok"] = PoolLabel(name="ok", pool="main", provider="p", cloud_image="c",
                                  options={"min-ram": 512})
    pool.labels["both"] = PoolLabel(name="both", pool="main", provider="p", cloud_image="c",
                                    diskimage="d", options={"flavor-name": "m1"})
    pool.labels["noflavor"] = PoolLabel(name="noflavor", pool="main", provider="p",
                                        cloud_image="c", options={})
    prov.pools["main"] = pool
    config = Config(providers={"p": prov})
    problems = DRIVER.check_provider(prov, config)
    text = "\n".join(f"{k}: {m}" for k, m in problems)
    assert "providers[0].pools[0].labels[1]: label both: exactly one of diskimage" in text
    assert "labels[2]: label noflavor: at least one of min-ram and flavor-name" in text
    assert "cloud-images[0]: cloud image c: image-id and image-name" in text
    assert len(problems) == 3
    assert DRIVER.check_cloud(prov) is None
    prov.options["cloud"] = "other"         # the host's clouds.yaml is not the file's business
    assert len(DRIVER.check_provider(prov, config)) == 3
    assert "cloud 'other' cannot be loaded from clouds.yaml" in DRIVER.check_cloud(prov)
    DRIVER.finalize(prov, config)
    assert prov.options["image-format"] == "qcow2"


def test_calls_are_named_after_the_sdk_method_they_reach():
    from nodepool.drivers.openstack.adapter import SdkMethodName

    class Proxy:
        def get_endpoint(self):
            return "http://compute"

        def get_limits(self):
            return "limits"

    class Connection:
        compute = Proxy()

        def get_external_ipv4_floating_networks(self):
            return []

    named = SdkMethodName(Connection())
    assert named.compute.get_limits() == "limits"
    assert named.operation == "compute.get_limits"
    named = SdkMethodName(Connection())
    assert named.get_external_ipv4_floating_networks() == []
    assert named.operation == "get_external_ipv4_floating_networks"
