"""The launcher end to end with ``driver: aws`` against a real moto server over HTTP.

The launcher runs in a thread of the test process on the embedded SQLite store; moto makes
instances ``running`` at once, so host-key scanning is off (no sshd behind moto's addresses).
"""
import pytest

from fixtures.launcher import wait_until
from fixtures.moto import REGION
from nodepool.drivers.base import META_NODE_ID, META_POOL, META_PROVIDER
from nodepool.model import NodeState, RequestState

pytestmark = pytest.mark.slow

CONFIG = """\
labels:
  - name: small
    min-ready: {min_ready}
providers:
  - name: aws1
    driver: aws
    region-name: {region}
    endpoint-url: {endpoint}
    rate: 200
    max-resources:
      L-1216C47A: {vcpus}
    cloud-images:
      - name: ubuntu
        username: ubuntu
        image-filters:
          - name: name
            values: ['ubuntu/images/hvm-ssd/ubuntu-trusty-14.04*']
    pools:
      - name: main
        max-servers: 10
        host-key-checking: false
        labels:
          - name: small
            cloud-image: ubuntu
            instance-type: t3.medium
            key-name: zuul
"""


def write(env, moto, min_ready=0, vcpus=100):
    return env.write(CONFIG.format(min_ready=min_ready, region=REGION, endpoint=moto.url,
                                   vcpus=vcpus))


def running(moto, node_id=None):
    """Instances of provider aws1 that are not terminated (optionally of one node)."""
    ec2 = moto.client("ec2")
    filters = [{"Name": f"tag:{META_PROVIDER}", "Values": ["aws1"]},
               {"Name": "instance-state-name", "Values": ["pending", "running"]}]
    if node_id:
        filters.append({"Name": f"tag:{META_NODE_ID}", "Values": [node_id]})
    return [i for r in ec2.describe_instances(Filters=filters)["Reservations"]
            for i in r["Instances"]]


def ready_unallocated(store):
    return [n for n in store.list_nodes() if n.state == NodeState.READY and not n.allocated_to]


def test_min_ready_request_and_used_node_terminated(sqlite_launcher_env, moto):
    env = sqlite_launcher_env
    write(env, moto, min_ready=1)
    env.start_launcher()
    client = env.client()
    ready = wait_until(lambda: ready_unallocated(client.store), timeout=60,
                       message="a min-ready node")[0]
    assert ready.provider == "aws1" and ready.pool == "main"
    assert ready.external_id.startswith("i-") and ready.interface_ip
    assert ready.region == REGION and ready.az.startswith(REGION)
    assert ready.username == "ubuntu"
    assert ready.resources["cores"] == 2 and ready.resources["L-1216C47A"] == 2
    [instance] = running(moto, ready.id)
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags["Name"] == f"np{ready.id}" and tags[META_POOL] == "main"

    nodes = client.request(["small"], timeout=60)
    assert nodes[0].id == ready.id
    client.use(nodes)
    client.release(nodes)
    wait_until(lambda: client.store.get_node(ready.id) is None, timeout=60,
               message="used node deleted")
    assert running(moto, ready.id) == []
    # min-ready refills with a new instance
    wait_until(lambda: ready_unallocated(client.store), timeout=60, message="min-ready refilled")


def test_leaked_instance_and_volume_are_removed(sqlite_launcher_env, moto):
    """An instance and a volume tagged as ours whose node has no record (a launcher was
    killed after launching) are deleted by the next launcher's leak scan."""
    env = sqlite_launcher_env
    write(env, moto)
    ec2 = moto.client("ec2")
    image = ec2.describe_images(Filters=[{"Name": "name", "Values": ["ubuntu*"]}])[
        "Images"][0]["ImageId"]
    tags = [{"Key": META_PROVIDER, "Value": "aws1"}, {"Key": META_POOL, "Value": "main"},
            {"Key": META_NODE_ID, "Value": "0000009999"}]
    leaked = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="t3.medium",
                               TagSpecifications=[{"ResourceType": "instance", "Tags": tags}])[
        "Instances"][0]["InstanceId"]
    volume = ec2.create_volume(AvailabilityZone=f"{REGION}a", Size=1, TagSpecifications=[
        {"ResourceType": "volume", "Tags": tags}])["VolumeId"]
    other = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1,
                              InstanceType="t3.micro")["Instances"][0]["InstanceId"]
    env.start_launcher()

    def state(instance_id):
        return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0][
            "Instances"][0]["State"]["Name"]
    wait_until(lambda: state(leaked) == "terminated", timeout=60,
               message="leaked instance terminated")
    wait_until(lambda: not ec2.describe_volumes(
        Filters=[{"Name": "volume-id", "Values": [volume]}])["Volumes"], timeout=60,
        message="leaked volume deleted")
    assert state(other) == "running"        # not ours: never touched


def test_vcpu_quota_exhaustion_pauses_then_serves(sqlite_launcher_env, moto):
    """``max-resources`` caps the standard on-demand vCPU quota at one t3.medium: the second
    request waits (pool paused, not declined) until the first node is gone."""
    env = sqlite_launcher_env
    write(env, moto, vcpus=2)
    launcher = env.start_launcher()
    client = env.client()
    first = client.request(["small"], timeout=60)
    waiting = client.submit(["small"])
    wait_until(lambda: launcher.paused_pools == {"aws1/main"}, timeout=60,
               message="pool paused at quota")
    req = client.store.get_request(waiting.id)
    assert req.state == RequestState.REQUESTED and not req.declined_by
    assert len(running(moto)) == 1
    client.release(first)
    assert client.wait(waiting.id, timeout=60).state == RequestState.FULFILLED
