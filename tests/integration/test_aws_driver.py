"""The AWS adapter against a real moto server over HTTP.

moto cannot produce capacity/quota refusals or throttling, so those error paths use botocore's
``Stubber`` on the adapter's own client (the mapping and retry code is the same); moto accepts
any credentials, so "cannot reach the API" is tested with an unreachable endpoint and an
unknown region instead of wrong keys.  moto answers ``import_snapshot`` with HTTP 500: the
VM Import polling is tested with a Stubber, the AMI path end to end with ``ebs-direct`` (moto
implements the EBS direct API).  moto launches an EC2 fleet's instance at once and keeps
dedicated hosts, but never refuses capacity or checks that a host fits the instance: those
answers are stubbed or untested (see docs/aws.md).
"""
import textwrap

import pytest
from botocore.stub import ANY, Stubber

from fixtures.moto import REGION, free_port
from nodepool.config import load_config
from nodepool.drivers import get_driver
from nodepool.drivers.base import (META_BUILD_ID, META_NODE_ID, META_POOL, META_PROVIDER,
                                   META_UPLOAD_ID, ImageUploadSpec, LaunchSpec)
from nodepool.errors import (InstanceNotFound, LabelConfigurationError, PermanentCloudError,
                             QuotaError, TransientCloudError)
from nodepool.model.records import NodeRequest

BUCKET = "np-images"


CONFIG = """\
embedded-store:
  path: {tmp}/state.sqlite
labels:
  - name: small
  - name: spotty
  - name: built
diskimages:
  - name: debian
    elements: [debian-minimal]
providers:
  - name: aws1
    driver: aws
    region-name: {region}
    endpoint-url: {endpoint}
    rate: 1000
    object-storage:
      bucket-name: {bucket}
{provider_extra}
    cloud-images:
      - name: ubuntu
        username: ubuntu
{cloud_image}
    diskimages:
      - name: debian
        import-method: ebs-direct
        volume-size: 2
        tags:
          team: ci
    pools:
      - name: main
        max-servers: 10
{pool_extra}
        labels:
          - name: small
            cloud-image: ubuntu
            instance-type: t3.medium
            key-name: zuul
            tags:
              team: ci
            dynamic-tags:
              request: "{{request.id}}"
              tenant: "{{request.tenant_name}}"
          - name: spotty
            cloud-image: ubuntu
            instance-type: c5.large
            use-spot: true
          - name: built
            diskimage: debian
            instance-type: t3.medium
"""
UBUNTU_FILTERS = """\
image-filters:
  - name: name
    values: ['ubuntu/images/hvm-ssd/ubuntu-trusty-14.04*']
"""


def write_config(tmp_path, endpoint, provider_extra="", pool_extra="",
                 cloud_image=UBUNTU_FILTERS):
    def indent(text, n):
        return textwrap.indent(textwrap.dedent(text), " " * n).rstrip("\n")
    text = CONFIG.format(tmp=tmp_path, region=REGION, endpoint=endpoint, bucket=BUCKET,
                         provider_extra=indent(provider_extra, 4),
                         cloud_image=indent(cloud_image, 8), pool_extra=indent(pool_extra, 8))
    path = tmp_path / "nodepool.yaml"
    path.write_text(text)
    return load_config(str(path))


@pytest.fixture
def aws(moto, tmp_path):
    """(config, adapter) for provider ``aws1`` on the moto server; stops the adapter after."""
    made = []

    def make(**kw):
        config = write_config(tmp_path, moto.url, **kw)
        prov = config.providers["aws1"]
        adapter = get_driver("aws").adapter(prov)
        adapter.retry_delays = (0.01, 0.01, 0.01)
        adapter.start()
        made.append(adapter)
        return config, adapter
    yield make
    for adapter in made:
        adapter.stop()


def spec_for(config, label_name, node_id="0000000001", request=None, image_id=None):
    prov = config.providers["aws1"]
    pool = prov.pools["main"]
    label = pool.labels[label_name]
    meta = {META_NODE_ID: node_id, META_POOL: "main", META_PROVIDER: "aws1"}
    return LaunchSpec(hostname=f"np{node_id}", label=label, pool=pool, metadata=meta,
                      request=request, node_id=node_id, image_external_id=image_id)


def run_machine(machine, limit=200):
    for _ in range(limit):
        result = machine.advance()
        if machine.complete:
            return result
    raise AssertionError(f"machine not complete after {limit} steps (state {machine.state})")


def instance_tags(moto, instance_id):
    ec2 = moto.client("ec2")
    raw = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    return {t["Key"]: t["Value"] for t in raw.get("Tags", [])}, raw


def test_launch_tags_addresses_and_size(aws, moto):
    config, adapter = aws()
    request = NodeRequest(node_types=["small"], requestor="zuul", tenant_name="tenant-a",
                          id="100-0000000007")
    machine = adapter.create_state_machine(spec_for(config, "small", request=request))
    inst = run_machine(machine)
    assert machine.external_id == inst.external_id
    assert inst.ready and inst.node_id == "0000000001"
    assert inst.public_ipv4 and inst.private_ipv4
    assert inst.interface_ip == inst.public_ipv4
    assert inst.region == REGION and inst.az.startswith(REGION)
    assert inst.username == "ubuntu"
    assert dict(inst.resources) == {"instances": 1, "cores": 2, "ram": 4096, "L-1216C47A": 2}
    tags, raw = instance_tags(moto, inst.external_id)
    assert tags["Name"] == "np0000000001"
    assert tags[META_PROVIDER] == "aws1" and tags[META_POOL] == "main"
    assert tags["team"] == "ci"
    assert tags["request"] == "100-0000000007" and tags["tenant"] == "tenant-a"
    assert raw["KeyName"] == "zuul"
    assert raw["InstanceType"] == "t3.medium"
    # the newest image matching the filters was chosen
    assert "ubuntu-trusty" in moto.client("ec2").describe_images(
        ImageIds=[raw["ImageId"]])["Images"][0]["Name"]


def test_internal_ip_when_the_pool_says_so(aws):
    config, adapter = aws(pool_extra="use-internal-ip: true\n")
    inst = run_machine(adapter.create_state_machine(spec_for(config, "small")))
    assert inst.interface_ip == inst.private_ipv4


def test_spot_launch(aws, moto):
    config, adapter = aws()
    inst = run_machine(adapter.create_state_machine(spec_for(config, "spotty")))
    _, raw = instance_tags(moto, inst.external_id)
    assert raw.get("InstanceLifecycle") == "spot"
    assert inst.node_properties == [{"spot": True}]
    assert inst.resources["L-34B43A08"] == 2      # spot vCPUs count against the spot quota


def test_waiting_machines_share_one_listing(aws):
    config, adapter = aws()
    adapter.quota_for_label(config.providers["aws1"].pools["main"].labels["small"])
    adapter.instances.ttl = 3600       # only "listed after my launch" forces a refresh
    machines = [adapter.create_state_machine(spec_for(config, "small", f"000000001{i}"))
                for i in range(5)]
    for m in machines:
        m.advance()                    # image lookup (once, cached) + run_instances each
    assert all(m.external_id for m in machines)
    before = adapter.rate_limiter.calls
    for _ in range(3):
        for m in machines:
            if not m.complete:
                m.advance()
    assert all(m.complete for m in machines)
    assert adapter.rate_limiter.calls - before == 1     # one describe_instances for all five


def test_list_instances_sees_every_instance_with_sizes(aws, moto):
    config, adapter = aws()
    ours = run_machine(adapter.create_state_machine(spec_for(config, "small")))
    ec2 = moto.client("ec2")
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    other = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1,
                              InstanceType="m5.xlarge")["Instances"][0]["InstanceId"]
    adapter.instances.invalidate()
    calls = adapter.rate_limiter.calls
    found = {i.external_id: i for i in adapter.list_instances()}
    assert adapter.rate_limiter.calls - calls == 2     # one listing + one instance-types call
    assert found[ours.external_id].node_id == "0000000001"
    assert found[other].node_id is None
    assert found[other].resources["cores"] == 4 and found[other].resources["ram"] == 16384


def test_delete_terminates_and_removes_left_volumes(aws, moto):
    config, adapter = aws()
    inst = run_machine(adapter.create_state_machine(spec_for(config, "small")))
    ec2 = moto.client("ec2")
    extra = ec2.create_volume(AvailabilityZone=inst.az, Size=1)["VolumeId"]
    ec2.attach_volume(VolumeId=extra, InstanceId=inst.external_id, Device="/dev/sdf")
    adapter.instances.invalidate()
    assert run_machine(adapter.delete_state_machine(inst.external_id)) is True
    _, raw = instance_tags(moto, inst.external_id)
    assert raw["State"]["Name"] == "terminated"
    assert ec2.describe_volumes(Filters=[{"Name": "volume-id", "Values": [extra]}])[
        "Volumes"] == []
    # deleting again (already terminated) and deleting an unknown id both complete
    assert run_machine(adapter.delete_state_machine(inst.external_id)) is True
    assert run_machine(adapter.delete_state_machine("i-0123456789abcdef0")) is True


def test_leaked_volume_listed_and_deleted(aws, moto):
    config, adapter = aws()
    ec2 = moto.client("ec2")
    tags = [{"Key": META_PROVIDER, "Value": "aws1"}, {"Key": META_NODE_ID, "Value": "0000000099"}]
    vol = ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=1, TagSpecifications=[
        {"ResourceType": "volume", "Tags": tags}])["VolumeId"]
    ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=1, TagSpecifications=[
        {"ResourceType": "volume", "Tags": [{"Key": META_PROVIDER, "Value": "other"}]}])
    found = [r for r in adapter.list_resources() if r.type == "volume"]
    assert [(r.id, r.metadata[META_NODE_ID]) for r in found] == [(vol, "0000000099")]
    adapter.delete_resource(found[0])
    adapter.delete_resource(found[0])          # already gone: not an error
    assert [r for r in adapter.list_resources() if r.type == "volume"] == []


def test_quota_for_label_and_limits(aws):
    config, adapter = aws(provider_extra="max-servers: 5\nmax-cores: 40\n"
                                         "max-resources:\n  L-1216C47A: 6\n")
    pool = config.providers["aws1"].pools["main"]
    assert dict(adapter.quota_for_label(pool.labels["small"])) == {
        "instances": 1, "cores": 2, "ram": 4096, "L-1216C47A": 2}
    limits = adapter.quota_limits()     # moto's Service Quotas knows no EC2 code: max-* only
    assert dict(limits) == {"instances": 5, "cores": 40, "L-1216C47A": 6}
    assert adapter._quota_warned        # the missing service quota was logged (once)


def test_unknown_instance_type_breaks_the_label(aws):
    config, adapter = aws()
    label = config.providers["aws1"].pools["main"].labels["small"]
    label.options["instance-type"] = "zz9.plural"
    with pytest.raises(LabelConfigurationError, match="label small.*zz9.plural"):
        adapter.quota_for_label(label)


def test_missing_ami_by_id(aws):
    config, adapter = aws(cloud_image="image-id: ami-0000dead")
    label = config.providers["aws1"].pools["main"].labels["small"]
    assert adapter.label_ready(label) is False
    with pytest.raises(LabelConfigurationError,
                       match="aws1.*label small.*image ami-0000dead not found"):
        run_machine(adapter.create_state_machine(spec_for(config, "small")))


def test_filters_matching_nothing(aws):
    config, adapter = aws(cloud_image="image-filters:\n  - name: name\n"
                                      "    values: [no-such-image-*]\n")
    label = config.providers["aws1"].pools["main"].labels["small"]
    assert adapter.label_ready(label) is False
    with pytest.raises(LabelConfigurationError, match="no image matches"):
        run_machine(adapter.create_state_machine(spec_for(config, "small")))


def test_console_log(aws):
    config, adapter = aws()
    inst = run_machine(adapter.create_state_machine(spec_for(config, "small")))
    assert "Linux" in adapter.console_log(inst.external_id)


@pytest.mark.parametrize("code,error", [
    ("InsufficientInstanceCapacity", QuotaError),
    ("VcpuLimitExceeded", QuotaError),
    ("InstanceLimitExceeded", QuotaError),
    ("MaxSpotInstanceCountExceeded", QuotaError),
    ("UnauthorizedOperation", PermanentCloudError),
    ("InvalidParameterValue", PermanentCloudError),
])
def test_run_instances_errors_mapped(aws, code, error):
    """moto never refuses for capacity or permissions: a Stubber answers run_instances."""
    config, adapter = aws()
    machine = adapter.create_state_machine(spec_for(config, "small"))
    adapter.cloud_image_info(config.providers["aws1"].cloud_images["ubuntu"])   # cache image
    with Stubber(adapter.client("ec2")) as stub:
        stub.add_client_error("run_instances", service_error_code=code, service_message="refused",
                              http_status_code=400)
        with pytest.raises(error, match=f"aws1.*node 0000000001.*{code}|aws1.*{code}"):
            machine.advance()
    assert machine.external_id is None


def test_throttling_is_retried_then_transient(aws):
    config, adapter = aws()
    slept = []
    adapter.sleep = slept.append
    ec2 = adapter.client("ec2")
    with Stubber(ec2) as stub:
        stub.add_client_error("describe_availability_zones",
                              service_error_code="RequestLimitExceeded", http_status_code=503)
        stub.add_response("describe_availability_zones",
                          {"AvailabilityZones": [{"ZoneName": "us-east-1a",
                                                  "State": "available"}]})
        assert adapter.availability_zones() == ["us-east-1a"]
        adapter.forget("azs")
        for _ in range(4):
            stub.add_client_error("describe_availability_zones",
                                  service_error_code="RequestLimitExceeded",
                                  http_status_code=503)
        with pytest.raises(TransientCloudError, match="aws1.*RequestLimitExceeded"):
            adapter.availability_zones()
    assert slept == [0.01, 0.01, 0.01, 0.01]


def test_run_instances_retried_after_a_lost_answer_repeats_its_client_token(aws, moto):
    """A read timeout after EC2 accepted run_instances: the retry must carry the same
    ClientToken, so EC2 answers with the instance the first call made instead of launching a
    second one.  moto records ClientToken but does not deduplicate by it (it would launch two),
    so this checks what goes over the wire; a new create state machine (the next launch attempt)
    gets a new token."""
    from urllib.parse import parse_qs
    from botocore.exceptions import ReadTimeoutError
    config, adapter = aws()
    ec2 = adapter.client("ec2")
    sent = []

    def record(request, **kw):
        sent.append(parse_qs(request.body.decode() if isinstance(request.body, bytes)
                             else request.body).get("ClientToken", [None])[0])

    def lose_first_answer(**kw):
        if len(sent) == 1:
            raise ReadTimeoutError(endpoint_url=moto.url)

    ec2.meta.events.register("before-send.ec2.RunInstances", record)
    ec2.meta.events.register("after-call.ec2.RunInstances", lose_first_answer)
    machine = adapter.create_state_machine(spec_for(config, "small"))
    inst = run_machine(machine)
    assert inst.ready
    assert len(sent) == 2 and sent[0] == sent[1]
    assert sent[0].startswith("np0000000001-") and len(sent[0]) <= 64
    run_machine(adapter.create_state_machine(spec_for(config, "small")))
    assert len(sent) == 3 and sent[2] != sent[0]


def test_unreachable_endpoint_is_transient(moto, tmp_path):
    config = write_config(tmp_path, f"http://127.0.0.1:{free_port()}")
    adapter = get_driver("aws").adapter(config.providers["aws1"])
    adapter.retry_delays = (0.01,)
    adapter.start()
    try:
        with pytest.raises(TransientCloudError, match="aws1.*unreachable"):
            adapter.list_instances()
    finally:
        adapter.stop()


def test_unknown_region_is_permanent(moto, tmp_path):
    config = write_config(tmp_path, "x")
    prov = config.providers["aws1"]
    prov.options.pop("endpoint-url")
    prov.options["region-name"] = "mars-north-1"
    adapter = get_driver("aws").adapter(prov)
    with pytest.raises(PermanentCloudError, match="aws1.*unknown region 'mars-north-1'"):
        adapter.start()


def test_check_cloud_reports_missing_credentials_and_start_refuses(moto, tmp_path,
                                                                   monkeypatch):
    config = write_config(tmp_path, moto.url)
    prov = config.providers["aws1"]
    driver = get_driver("aws")
    assert driver.check_cloud(prov) is None
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert "aws1" in driver.check_cloud(prov)
    assert "no AWS credentials found" in driver.check_cloud(prov)
    with pytest.raises(PermanentCloudError, match="no AWS credentials found"):
        driver.adapter(prov).start()


# -- images ----------------------------------------------------------------------------------------

def upload_spec(config, tmp_path, build="b1" * 16, upload="0000000001"):
    path = tmp_path / "debian.raw"
    # three blocks of 512 KiB: data, zeros (skipped), a short last one with data
    path.write_bytes(b"x" * 524288 + b"\0" * 524288 + b"y" * 1000)
    prov = config.providers["aws1"]
    meta = {META_BUILD_ID: build, META_UPLOAD_ID: upload, META_PROVIDER: "aws1"}
    return ImageUploadSpec(image_name=f"debian-{upload}", filename=str(path), image_format="raw",
                           metadata=meta, provider_image=prov.diskimages["debian"])


def test_image_upload_boot_and_delete_via_ebs_direct(aws, moto, tmp_path):
    config, adapter = aws()
    ec2 = moto.client("ec2")
    spec = upload_spec(config, tmp_path)
    written = []
    real_client = adapter.client

    def spying_client(service):
        client = real_client(service)
        if service == "ebs" and not hasattr(client, "_spied"):
            put = client.put_snapshot_block

            def spy(**kw):
                written.append((kw["BlockIndex"], kw["DataLength"]))
                return put(**kw)
            client.put_snapshot_block = spy
            client._spied = True
        return client
    adapter.client = spying_client
    image_id = adapter.upload_image(spec)
    assert sorted(written) == [(0, 524288), (2, 524288)]     # the zero block is skipped
    image = ec2.describe_images(ImageIds=[image_id])["Images"][0]
    tags = {t["Key"]: t["Value"] for t in image["Tags"]}
    assert tags[META_BUILD_ID] == spec.metadata[META_BUILD_ID] and tags["team"] == "ci"
    # (moto's register_image makes a snapshot of its own instead of using ours)
    ours = ec2.describe_snapshots(OwnerIds=["self"], Filters=[
        {"Name": f"tag:{META_UPLOAD_ID}", "Values": ["0000000001"]}])["Snapshots"]
    assert len(ours) == 1 and ours[0]["VolumeSize"] == 2 and ours[0]["State"] == "completed"
    # nothing staged in S3 (the bucket is not needed: made here for delete_image's check)
    assert moto.client("s3").list_buckets()["Buckets"] == []
    moto.client("s3").create_bucket(Bucket=BUCKET)
    resources = adapter.list_resources()
    assert [(r.type, r.id) for r in resources] == [("image", image_id)]
    assert [r.id for r in adapter.list_images()] == [image_id]

    inst = run_machine(adapter.create_state_machine(
        spec_for(config, "built", image_id=image_id)))
    _, raw = instance_tags(moto, inst.external_id)
    assert raw["ImageId"] == image_id

    adapter.delete_image(image_id)
    assert ec2.describe_images(Owners=["self"])["Images"] == []
    assert ec2.describe_snapshots(OwnerIds=["self"], Filters=[
        {"Name": f"tag:{META_PROVIDER}", "Values": ["aws1"]}])["Snapshots"] == []
    adapter.delete_image(image_id)          # already gone: not an error


def test_ebs_direct_needs_a_raw_image(aws, tmp_path):
    config, adapter = aws()
    spec = upload_spec(config, tmp_path)
    spec.image_format = "vhd"
    with pytest.raises(PermanentCloudError, match="ebs-direct needs a raw image"):
        adapter.upload_image(spec)


def test_upload_leftovers_become_leak_candidates_once_old(aws, moto, tmp_path):
    config, adapter = aws()
    moto.client("s3").create_bucket(Bucket=BUCKET)
    image_id = adapter.upload_image(upload_spec(config, tmp_path))
    moto.client("ec2").deregister_image(ImageId=image_id)     # the AMI went, pieces stayed
    assert {r.type for r in adapter.list_resources()} == set()   # young: upload may run
    adapter.upload_grace = 0
    found = {r.type for r in adapter.list_resources()}
    assert found == {"snapshot"}
    for res in adapter.list_resources():
        adapter.delete_resource(res)
    assert adapter.list_resources() == []


def test_upload_without_bucket_fails_clearly(aws, moto, tmp_path):
    config, adapter = aws()
    spec = upload_spec(config, tmp_path)
    spec.provider_image.options["import-method"] = "snapshot"
    with pytest.raises(PermanentCloudError, match=f"aws1.*upload image.*bucket {BUCKET}"):
        adapter.upload_image(spec)


def test_import_snapshot_on_moto_fails_transient_and_cleans_up(aws, moto, tmp_path):
    """moto answers import_snapshot with HTTP 500: the upload fails as transient and removes
    the staged S3 object."""
    config, adapter = aws()
    s3 = moto.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    spec = upload_spec(config, tmp_path)
    spec.provider_image.options["import-method"] = "snapshot"
    with pytest.raises(TransientCloudError, match="aws1.*import snapshot"):
        adapter.upload_image(spec)
    assert s3.list_objects_v2(Bucket=BUCKET).get("Contents", []) == []


def test_import_snapshot_polling(aws, tmp_path):
    """The VM Import path as AWS runs it, answered by a Stubber: task active, then
    completed → snapshot tagged → AMI registered with it and tagged."""
    from nodepool.drivers.aws.images import ImageUpload
    config, adapter = aws()
    spec = upload_spec(config, tmp_path)
    upload = ImageUpload(adapter, spec)
    upload.deadline = float("inf")
    slept = []
    adapter.sleep = slept.append
    ec2 = adapter.client("ec2")
    with Stubber(ec2) as stub:
        stub.add_response("import_snapshot", {"ImportTaskId": "import-snap-1"})
        stub.add_response("describe_import_snapshot_tasks", {"ImportSnapshotTasks": [
            {"ImportTaskId": "import-snap-1",
             "SnapshotTaskDetail": {"Status": "active", "Progress": "10"}}]})
        stub.add_response("describe_import_snapshot_tasks", {"ImportSnapshotTasks": [
            {"ImportTaskId": "import-snap-1",
             "SnapshotTaskDetail": {"Status": "completed", "SnapshotId": "snap-1"}}]})
        stub.add_response("create_tags", {}, {"Resources": ["snap-1"],
                                              "Tags": ANY})
        stub.add_response("register_image", {"ImageId": "ami-1"})
        stub.add_response("create_tags", {}, {"Resources": ["ami-1"], "Tags": ANY})
        snapshot = upload.import_snapshot("nodepool/aws1/debian.raw")
        assert snapshot == "snap-1"
        assert upload.register(snapshot) == "ami-1"
        stub.assert_no_pending_responses()
    assert slept == [adapter.upload_poll]
    assert ("snapshot", "snap-1") in upload.created and ("image", "ami-1") in upload.created


def test_import_snapshot_task_failure(aws, tmp_path):
    from nodepool.drivers.aws.images import ImageUpload
    config, adapter = aws()
    upload = ImageUpload(adapter, upload_spec(config, tmp_path))
    upload.deadline = float("inf")
    with Stubber(adapter.client("ec2")) as stub:
        stub.add_response("import_snapshot", {"ImportTaskId": "import-snap-2"})
        stub.add_response("describe_import_snapshot_tasks", {"ImportSnapshotTasks": [
            {"SnapshotTaskDetail": {"Status": "deleted", "StatusMessage": "bad disk"}}]})
        with pytest.raises(TransientCloudError, match="import-snap-2 deleted: bad disk"):
            upload.import_snapshot("k")


def test_not_found_on_delete_is_instance_not_found(aws):
    config, adapter = aws()
    with pytest.raises(InstanceNotFound):
        adapter.ec2("terminate", "terminate_instances", True, InstanceIds=["i-0123456789abcdef0"])
