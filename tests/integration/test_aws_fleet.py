"""AWS labels launched by an EC2 fleet or on a dedicated host, against a real moto server, and
the diskimage login a provider's ``diskimages`` entry sets.

moto runs an instant fleet (launch template + ``create_fleet``) and starts one instance at once;
it keeps dedicated hosts and places instances on them.  It never refuses capacity, ignores the
allocation strategy and does not check that an instance fits its host: the fleet's error
answers are tested with botocore's ``Stubber``; host capacity errors are untested.
"""

import pytest
from botocore.stub import ANY, Stubber

from fixtures.moto import REGION
from nodepool.config import load_config
from nodepool.drivers import get_driver
from nodepool.drivers.aws.adapter import fleet_arguments, launch_template_data
from nodepool.drivers.base import META_NODE_ID, META_POOL, META_PROVIDER, LaunchSpec
from nodepool.errors import QuotaError

CONFIG = """\
embedded-store:
  path: {tmp}/state.sqlite
labels: [{{name: fleet}}, {{name: spotfleet}}, {{name: host}}, {{name: built}}]
diskimages: [{{name: deb, username: debian}}]
providers:
  - name: aws1
    driver: aws
    region-name: {region}
    endpoint-url: {endpoint}
    rate: 1000
    cloud-images:
      - name: ubuntu
        username: ubuntu
        image-filters:
          - Name: name
            Values: ['ubuntu/images/hvm-ssd/ubuntu-trusty-14.04*']
    diskimages:
      - name: deb
        import-method: ebs-direct
        username: admin
        python-path: /usr/bin/python3
    pools:
      - name: main
        availability-zone: {region}a
        labels:
          - name: fleet
            cloud-image: ubuntu
            userdata: "#!/bin/sh"
            fleet:
              instance-types: [t3.medium, t3.large]
              allocation-strategy: prioritized
          - name: spotfleet
            cloud-image: ubuntu
            use-spot: true
            fleet:
              instance-types: [c5.large]
              allocation-strategy: price-capacity-optimized
          - name: host
            cloud-image: ubuntu
            instance-type: m5.large
            dedicated-host: true
          - name: built
            diskimage: deb
            instance-type: t3.medium
"""


@pytest.fixture
def aws(moto, tmp_path):
    path = tmp_path / "nodepool.yaml"
    path.write_text(CONFIG.format(tmp=tmp_path, region=REGION, endpoint=moto.url))
    config = load_config(str(path))
    adapter = get_driver("aws").adapter(config.providers["aws1"])
    adapter.retry_delays = (0.01, 0.01, 0.01)
    adapter.start()
    yield config, adapter
    adapter.stop()


def spec_for(config, label, node_id="0000000001", image_id=None):
    pool = config.providers["aws1"].pools["main"]
    meta = {META_NODE_ID: node_id, META_POOL: "main", META_PROVIDER: "aws1"}
    return LaunchSpec(hostname=f"np{node_id}", label=pool.labels[label], pool=pool,
                      metadata=meta, node_id=node_id, image_external_id=image_id)


def run(machine, limit=200):
    for _ in range(limit):
        result = machine.advance()
        if machine.complete:
            return result
    raise AssertionError(f"not complete (state {machine.state})")


def raw_instance(moto, instance_id):
    return moto.client("ec2").describe_instances(InstanceIds=[instance_id])[
        "Reservations"][0]["Instances"][0]


def test_fleet_launch_tags_and_leaves_no_template(aws, moto):
    config, adapter = aws
    inst = run(adapter.create_state_machine(spec_for(config, "fleet")))
    raw = raw_instance(moto, inst.external_id)
    tags = {t["Key"]: t["Value"] for t in raw["Tags"]}
    assert tags[META_NODE_ID] == "0000000001" and tags["Name"] == "np0000000001"
    assert raw["InstanceType"] in ("t3.medium", "t3.large")
    assert inst.username == "ubuntu"
    # the launch template made for the launch is gone again
    assert moto.client("ec2").describe_launch_templates()["LaunchTemplates"] == []
    # the label costs what its biggest type costs
    quota = adapter.quota_for_label(config.providers["aws1"].pools["main"].labels["fleet"])
    assert dict(quota) == {"instances": 1, "cores": 2, "ram": 8192, "L-1216C47A": 2}
    run(adapter.delete_state_machine(inst.external_id))
    state = raw_instance(moto, inst.external_id)["State"]["Name"]
    assert state == "terminated"


def test_fleet_arguments_follow_the_market():
    kwargs = {"ImageId": "ami-1", "InstanceType": None, "ClientToken": "tok", "MinCount": 1,
              "MaxCount": 1, "UserData": "#!/bin/sh",
              "TagSpecifications": [{"ResourceType": "instance", "Tags": []},
                                    {"ResourceType": "volume", "Tags": []}]}
    data = launch_template_data(kwargs)
    assert data["UserData"] == "IyEvYmluL3No" and "InstanceType" not in data
    fleet = {"instance-types": ["a", "b"], "allocation-strategy": "lowest-price"}
    on_demand = fleet_arguments(kwargs, fleet, False, "lt-1")
    assert on_demand["OnDemandOptions"] == {"AllocationStrategy": "lowest-price"}
    assert on_demand["TargetCapacitySpecification"]["DefaultTargetCapacityType"] == "on-demand"
    assert [o["InstanceType"] for o in on_demand["LaunchTemplateConfigs"][0]["Overrides"]] == \
        ["a", "b"]
    assert [t["ResourceType"] for t in on_demand["TagSpecifications"]] == ["instance"]
    spot = fleet_arguments(kwargs, fleet, True, "lt-1")
    assert "SpotOptions" in spot and "OnDemandOptions" not in spot


def test_spot_fleet_launch(aws, moto):
    config, adapter = aws
    inst = run(adapter.create_state_machine(spec_for(config, "spotfleet")))
    assert raw_instance(moto, inst.external_id)["InstanceType"] == "c5.large"
    quota = adapter.quota_for_label(config.providers["aws1"].pools["main"].labels["spotfleet"])
    assert quota["L-34B43A08"] == 2


def test_fleet_without_capacity_pauses_and_removes_its_template(aws):
    config, adapter = aws
    adapter.cloud_image_info(config.providers["aws1"].cloud_images["ubuntu"])   # cached
    ec2 = adapter.client("ec2")
    with Stubber(ec2) as stub:
        stub.add_response("create_launch_template",
                          {"LaunchTemplate": {"LaunchTemplateId": "lt-1"}}, {
                              "LaunchTemplateName": ANY, "LaunchTemplateData": ANY,
                              "TagSpecifications": ANY})
        stub.add_response("create_fleet", {"FleetId": "fleet-1", "Instances": [], "Errors": [
            {"ErrorCode": "InsufficientInstanceCapacity", "ErrorMessage": "none left"}]}, None)
        stub.add_response("delete_launch_template", {}, {"LaunchTemplateId": "lt-1"})
        with pytest.raises(QuotaError, match="fleet launched no instance.*"
                                             "InsufficientInstanceCapacity"):
            adapter.create_state_machine(spec_for(config, "fleet")).advance()
        stub.assert_no_pending_responses()


def test_dedicated_host_allocated_used_and_released(aws, moto):
    config, adapter = aws
    ec2 = moto.client("ec2")
    inst = run(adapter.create_state_machine(spec_for(config, "host")))
    raw = raw_instance(moto, inst.external_id)
    host_id = raw["Placement"]["HostId"]
    [host] = ec2.describe_hosts(HostIds=[host_id])["Hosts"]
    assert host["AvailabilityZone"] == f"{REGION}a"
    assert {t["Key"]: t["Value"] for t in host.get("Tags") or []}[META_NODE_ID] == "0000000001"
    assert inst.host_id == host_id
    # while the node lives, its host is a leak candidate the launcher judges by node id
    found = [r for r in adapter.list_resources() if r.type == "host"]
    assert [(r.id, r.metadata[META_NODE_ID]) for r in found] == [(host_id, "0000000001")]
    run(adapter.delete_state_machine(inst.external_id))
    assert ec2.describe_hosts(HostIds=[host_id])["Hosts"][0]["State"] == "released"
    assert [r for r in adapter.list_resources() if r.type == "host"] == []


def test_leaked_dedicated_host_is_released_by_delete_resource(aws, moto):
    config, adapter = aws
    ec2 = moto.client("ec2")
    host_id = ec2.allocate_hosts(AvailabilityZone=f"{REGION}a", InstanceType="m5.large",
                                 Quantity=1, TagSpecifications=[{
                                     "ResourceType": "dedicated-host",
                                     "Tags": [{"Key": META_PROVIDER, "Value": "aws1"},
                                              {"Key": META_NODE_ID, "Value": "77"}]}])[
        "HostIds"][0]
    [res] = [r for r in adapter.list_resources() if r.type == "host"]
    assert res.id == host_id
    adapter.delete_resource(res)
    assert ec2.describe_hosts(HostIds=[host_id])["Hosts"][0]["State"] == "released"


def test_provider_diskimage_sets_the_login(aws, moto):
    config, adapter = aws
    image_id = moto.client("ec2").describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    inst = run(adapter.create_state_machine(spec_for(config, "built", image_id=image_id)))
    assert (inst.username, inst.python_path) == ("admin", "/usr/bin/python3")
    assert inst.shell_type is None
