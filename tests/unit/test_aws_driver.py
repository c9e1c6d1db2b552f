"""Pure parts of the AWS driver: error mapping, quota codes, tags, leak rule, instance view,
config checks.  No server, no threads."""
import datetime

import pytest
import voluptuous as v
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from nodepool.drivers.aws import DRIVER
from nodepool.drivers.aws.adapter import (decode_console, instance_view, leak_candidates,
                                          newest_image)
from nodepool.drivers.aws.errors import translate_error
from nodepool.drivers.aws.quotas import instance_family, quota_code
from nodepool.drivers.aws.tags import instance_tags, s3_tagging
from nodepool.drivers.base import (META_BUILD_ID, META_NODE_ID, META_PROVIDER, META_UPLOAD_ID,
                                   CloudResource)
from nodepool.errors import (InstanceNotFound, PermanentCloudError, QuotaError,
                             TransientCloudError)
from nodepool.model.records import NodeRequest


def client_error(code, status=400):
    return ClientError({"Error": {"Code": code, "Message": f"{code} happened"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "RunInstances")


@pytest.mark.parametrize("code,status,cls", [
    ("InsufficientInstanceCapacity", 500, QuotaError),
    ("VcpuLimitExceeded", 400, QuotaError),
    ("MaxSpotInstanceCountExceeded", 400, QuotaError),
    ("RequestLimitExceeded", 503, TransientCloudError),
    ("Throttling", 400, TransientCloudError),
    ("InternalError", 500, TransientCloudError),
    ("SomethingNew", 502, TransientCloudError),
    ("AuthFailure", 401, PermanentCloudError),
    ("UnauthorizedOperation", 403, PermanentCloudError),
    ("InvalidAMIID.Malformed", 400, PermanentCloudError),
    ("InvalidParameterValue", 400, PermanentCloudError),
])
def test_error_classes(code, status, cls):
    err = translate_error(client_error(code, status), "provider p: run instance")
    assert type(err) is cls
    assert str(err).startswith("provider p: run instance") and code in str(err)


def test_not_found_depends_on_the_caller():
    exc = client_error("InvalidInstanceID.NotFound")
    assert isinstance(translate_error(exc, "x", missing_ok=True), InstanceNotFound)
    assert type(translate_error(exc, "x")) is PermanentCloudError


def test_local_errors():
    assert isinstance(translate_error(EndpointConnectionError(endpoint_url="http://x"), "x"),
                      TransientCloudError)
    assert isinstance(translate_error(NoCredentialsError(), "x"), PermanentCloudError)


@pytest.mark.parametrize("itype,family,code,spot", [
    ("t3.medium", "t", "L-1216C47A", "L-34B43A08"),
    ("m6i.large", "m", "L-1216C47A", "L-34B43A08"),
    ("inf2.xlarge", "inf", "L-1945791B", "L-B5D1601B"),
    ("g5.xlarge", "g", "L-DB2E81BA", "L-3819A6DF"),
    ("dl1.24xlarge", "dl", "L-6E869C2A", "L-85EED4F7"),
    ("u-6tb1.metal", "u", "L-1216C47A", "L-34B43A08"),
])
def test_quota_codes(itype, family, code, spot):
    assert instance_family(itype) == family
    assert quota_code(itype) == code
    assert quota_code(itype, spot=True) == spot


def test_instance_tags_order_and_dynamic():
    request = NodeRequest(node_types=["a"], requestor="zuul", id="200-0000000003")
    opts = {"tags": {"team": "ci", META_NODE_ID: "forged"},
            "dynamic-tags": {"req": "{request.id}", "bad": "{request.nope}"}}
    tags = instance_tags("np1", "a", opts, {META_NODE_ID: "0000000001"}, request)
    assert tags == {"team": "ci", META_NODE_ID: "0000000001", "req": "200-0000000003",
                    "Name": "np1"}
    long = instance_tags("np1", "a", {"tags": {"k": "v" * 300}}, {})
    assert len(long["k"]) == 256
    assert s3_tagging({"a": "b c", "d": "e"}) == "a=b+c&d=e"


def test_instance_view():
    raw = {"InstanceId": "i-1", "State": {"Name": "running"}, "InstanceType": "t3.medium",
           "PublicIpAddress": "1.2.3.4", "PrivateIpAddress": "10.0.0.1",
           "NetworkInterfaces": [{"Ipv6Addresses": [{"Ipv6Address": "2001:db8::1"}]}],
           "Placement": {"AvailabilityZone": "us-east-1b"}, "InstanceLifecycle": "spot",
           "Tags": [{"Key": META_NODE_ID, "Value": "0000000005"}]}
    inst = instance_view(raw, "us-east-1", {"t3.medium": (2, 4096)})
    assert inst.ready and not inst.deleted and inst.node_id == "0000000005"
    assert inst.interface_ip == "1.2.3.4" and inst.public_ipv6 == "2001:db8::1"
    assert dict(inst.resources) == {"instances": 1, "cores": 2, "ram": 4096, "L-34B43A08": 2}
    assert instance_view(raw, "r", {}, use_internal_ip=True).interface_ip == "10.0.0.1"
    raw["State"] = {"Name": "terminated"}
    assert instance_view(raw, "r", {}).deleted
    assert dict(instance_view(raw, "r", {}).resources) == {"instances": 1, "cores": 0, "ram": 0}


def test_leak_candidates():
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    old = now - datetime.timedelta(hours=2)
    young = now - datetime.timedelta(minutes=5)
    mine = {META_PROVIDER: "p"}
    upload = dict(mine, **{META_BUILD_ID: "b", META_UPLOAD_ID: "1"})
    items = [
        (CloudResource("volume", "vol-node", dict(mine, **{META_NODE_ID: "7"})), young),
        (CloudResource("snapshot", "snap-live", upload), old),         # its AMI exists
        (CloudResource("snapshot", "snap-ami", mine), old),            # named by our AMI
        (CloudResource("object", "obj-young", dict(upload, **{META_UPLOAD_ID: "2"})), young),
        (CloudResource("object", "obj-old", dict(upload, **{META_UPLOAD_ID: "2"})), old),
        (CloudResource("volume", "vol-untagged-age", mine), None),
    ]
    found = leak_candidates(items, {("b", "1")}, {"snap-ami"}, now, grace=3600)
    assert [r.id for r in found] == ["vol-node", "obj-old", "vol-untagged-age"]


def test_newest_image_and_console():
    assert newest_image([]) is None
    assert newest_image([{"ImageId": "a", "CreationDate": "2020-01-01"},
                         {"ImageId": "b", "CreationDate": "2021-01-01"}])["ImageId"] == "b"
    assert decode_console("aGVsbG8=") == "hello"
    assert decode_console("Linux version 6") == "Linux version 6"


def provider_schema():
    from nodepool.config.schema import provider_schema
    return provider_schema(DRIVER)


def test_schema_defaults_and_refusals():
    data = provider_schema()({"name": "a", "driver": "aws", "region-name": "us-east-1",
                              "pools": [{"name": "p", "labels": [
                                  {"name": "l", "cloud-image": "c",
                                   "instance-type": "t3.small"}]}]})
    assert data["rate"] == 2.0 and data["boot-timeout"] == 180
    assert data["image-format"] == "raw"
    label = data["pools"][0]["labels"][0]
    assert label["use-spot"] is False and label["tags"] == {}
    assert "public-ipv4" not in data["pools"][0]     # defaulted by finalize (alias rule)
    with pytest.raises(v.Invalid):
        provider_schema()({"name": "a", "driver": "aws"})                 # no region-name
    with pytest.raises(v.Invalid):
        provider_schema()({"name": "a", "driver": "aws", "region-name": "r",
                           "diskimages": [{"name": "d", "import-method": "create-volume"}]})


def test_config_cross_checks(tmp_path):
    from nodepool.config import load_config
    from nodepool.errors import ConfigError
    path = tmp_path / "nodepool.yaml"
    path.write_text("""\
labels: [{name: small}]
diskimages: [{name: deb}]
providers:
  - name: aws1
    driver: aws
    region-name: us-east-1
    cloud-images:
      - name: both
        image-id: ami-1
        image-filters: [{name: name, values: [x]}]
    diskimages: [{name: deb}]
    pools:
      - name: main
        labels:
          - name: small
            cloud-image: both
""")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    text = str(info.value)
    assert "exactly one of instance-type and fleet is required" in text
    assert "exactly one of image-id and image-filters" in text
    assert "object-storage.bucket-name is required" in text


def test_example_config_loads():
    import os
    from nodepool.config import load_config
    here = os.path.dirname(os.path.abspath(__file__))
    config = load_config(os.path.join(here, "..", "..", "examples", "aws.yaml"))
    prov = config.providers["aws-us-east-1"]
    assert prov.rate == 2.0 and prov.boot_timeout == 180
    assert prov.cloud_images["ubuntu-jammy"].options["image-filters"]
    assert prov.pools["main"].labels["debian-built"].diskimage == "debian"
    assert config.diskimages["debian"].formats == ["raw"]
