"""AWS adapter: EC2 launches and deletes as state machines over boto3.

One ``describe_instances`` listing per provider per ``LIST_TTL`` serves every state machine and
``list_instances``: a machine never describes its own instance.  Every API call goes through
the provider's rate limiter (``rate`` is operations per second) and is retried here a few
times when AWS throttles or answers 5xx; errors come back as ``nodepool.errors`` classes naming
the provider and the thing (see ``errors.py``).
"""
import base64
import binascii
import datetime
import logging
import os
import threading
import time
import uuid

import boto3
import botocore.config

from ...errors import (CloudError, InstanceNotFound, LabelConfigurationError,
                       PermanentCloudError, QuotaError, TransientCloudError)
from ...model.quota import Limits, Resources
from ..base import (META_BUILD_ID, META_NODE_ID, META_POOL, META_PROVIDER, META_UPLOAD_ID,
                    Adapter, CloudResource, Instance, StateMachine, apply_image_access)
from . import DEFAULT_IMAGE_FORMAT
from .errors import is_retryable, translate_error
from .quotas import quota_code
from .tags import instance_tags, tag_dict, tag_specifications

LIST_TTL = 1.0             # seconds one instance listing is shared before it is refreshed
NOT_LISTED_GRACE = 120     # seconds a new instance may be missing from listings (consistency)
UPLOAD_POLL = 5.0          # seconds between status checks while importing an image
UPLOAD_GRACE = 3600        # upload leftovers younger than this are never leak candidates
RETRY_DELAYS = (0.5, 1.0, 2.0)   # backoff for throttling/5xx/network errors, then give up
API_CONNECT_TIMEOUT = 10
API_READ_TIMEOUT = 60

log = logging.getLogger("nodepool.drivers.aws")


class Listing:
    """A list call shared by every reader for ``ttl`` seconds.

    ``get(after)`` returns a listing whose request started at or after monotonic time
    ``after``, fetching one if the cached one is older than that or than the TTL."""

    def __init__(self, fetch, ttl=LIST_TTL):
        self._fetch = fetch
        self.ttl = ttl
        self.items = None
        self.started = -1.0
        self._lock = threading.Lock()

    def get(self, after=None):
        with self._lock:
            now = time.monotonic()
            stale = self.items is None or now - self.started >= self.ttl
            if after is not None and self.started < after:
                stale = True
            if stale:
                started = time.monotonic()
                self.items = self._fetch()
                self.started = started
            return self.items

    def invalidate(self):
        with self._lock:
            self.started = -1.0


# -- pure helpers ---------------------------------------------------------------------------------

def instance_resources(instance_type, spot, sizes):
    """What one instance costs: instances, cores (vCPUs), ram (MiB), and its vCPUs under the
    family's service-quota code.  ``sizes`` maps type -> (vcpus, ram MiB)."""
    size = sizes.get(instance_type)
    if size is None:
        return Resources.of(instances=1)
    vcpus, ram = size
    res = Resources.of(instances=1, cores=vcpus, ram=ram)
    code = quota_code(instance_type, spot)
    if code:
        res[code] = vcpus
    return res


def instance_view(raw, region, sizes, use_internal_ip=False):
    """Our ``Instance`` for one entry of ``describe_instances``."""
    state = (raw.get("State") or {}).get("Name", "")
    ipv6 = raw.get("Ipv6Address")
    if not ipv6:
        for nic in raw.get("NetworkInterfaces") or []:
            for addr in nic.get("Ipv6Addresses") or []:
                ipv6 = addr.get("Ipv6Address")
                break
            if ipv6:
                break
    public4, private4 = raw.get("PublicIpAddress"), raw.get("PrivateIpAddress")
    if use_internal_ip:
        interface = private4 or public4 or ipv6
    else:
        interface = public4 or ipv6 or private4
    spot = raw.get("InstanceLifecycle") == "spot"
    return Instance(
        external_id=raw["InstanceId"], metadata=tag_dict(raw.get("Tags")),
        ready=state == "running", deleted=state == "terminated",
        interface_ip=interface, public_ipv4=public4, private_ipv4=private4, public_ipv6=ipv6,
        cloud="AWS", region=region, az=(raw.get("Placement") or {}).get("AvailabilityZone"),
        host_id=(raw.get("Placement") or {}).get("HostId"),
        node_properties=[{"spot": True}] if spot else [],
        resources=instance_resources(raw.get("InstanceType"), spot, sizes))


def newest_image(images):
    """The most recently created of ``describe_images`` results (None for none)."""
    if not images:
        return None
    return max(images, key=lambda i: (i.get("CreationDate") or "", i.get("ImageId") or ""))


def leak_candidates(items, live_uploads, live_snapshots, now, grace=UPLOAD_GRACE):
    """The non-instance resources the launcher may judge as leaks.

    ``items`` are ``(CloudResource, created datetime or None)``.  A node's volume is always a
    candidate (the launcher checks its node id).  An upload's snapshot, S3 object or staging
    volume belongs to the builder while its AMI exists (``live_uploads``: (build id, upload id)
    pairs; ``live_snapshots``: snapshot ids of our AMIs) or while the upload may still be
    running (younger than ``grace`` seconds); after that it is a candidate."""
    out = []
    for res, created in items:
        meta = res.metadata
        if meta.get(META_NODE_ID):
            out.append(res)
            continue
        if res.type == "snapshot" and res.id in live_snapshots:
            continue
        key = (meta.get(META_BUILD_ID), meta.get(META_UPLOAD_ID))
        if key != (None, None) and key in live_uploads:
            continue
        if created is not None and (now - created).total_seconds() < grace:
            continue
        out.append(res)
    return out


def decode_console(output):
    """EC2 returns console output base64-encoded; some endpoints return it as text."""
    if not output:
        return output
    try:
        return base64.b64decode(output, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return output


# -- the adapter ----------------------------------------------------------------------------------

class AwsAdapter(Adapter):
    """One AWS provider (a region of an account)."""

    def __init__(self, provider, rate_limiter=None):
        super().__init__(provider, rate_limiter)
        opts = provider.options
        self.region = opts["region-name"]
        self.profile = opts.get("profile-name")
        self.endpoint_url = opts.get("endpoint-url")
        self.bucket = (opts.get("object-storage") or {}).get("bucket-name")
        self.image_format = opts.get("image-format") or DEFAULT_IMAGE_FORMAT
        self.instances = Listing(self._describe_instances)
        self.retry_delays = RETRY_DELAYS
        self.sleep = time.sleep
        self.upload_poll = UPLOAD_POLL
        self.upload_grace = UPLOAD_GRACE
        self._clients = {}
        self._client_lock = threading.Lock()
        self._sizes = {}                   # instance type -> (vcpus, ram MiB)
        self._quota_warned = set()
        self.log = logging.getLogger(f"nodepool.drivers.aws.{provider.name}")

    @property
    def what(self):
        return f"provider {self.provider.name} (AWS {self.region})"

    # -- clients and calls ------------------------------------------------------------------------

    def start(self):
        """Build the clients (no API call).  An unknown region is refused here when we talk
        to AWS itself; with an endpoint override any region name is passed through.  No
        credentials at all (environment, profile, instance role) is refused too: every call
        would fail."""
        self.client("ec2")
        try:
            found = self._clients["_session"].get_credentials()
        except Exception as exc:
            raise translate_error(exc, f"{self.what}: credentials") from exc
        if found is None:
            raise PermanentCloudError(f"{self.what}: no AWS credentials found (environment, "
                                      f"profile {self.profile or 'default'} or instance role)")

    def _session(self):
        try:
            session = boto3.session.Session(profile_name=self.profile,
                                            region_name=self.region)
        except Exception as exc:
            raise translate_error(exc, f"{self.what}: profile {self.profile!r}") from exc
        if not (self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")):
            known = set()
            for partition in session.get_available_partitions():
                known.update(session.get_available_regions("ec2", partition_name=partition))
            if known and self.region not in known:
                raise PermanentCloudError(f"{self.what}: unknown region {self.region!r}")
        return session

    def client(self, service):
        with self._client_lock:
            client = self._clients.get(service)
            if client is None:
                session = self._clients.get("_session")
                if session is None:
                    session = self._clients["_session"] = self._session()
                config = botocore.config.Config(
                    retries={"total_max_attempts": 1}, connect_timeout=API_CONNECT_TIMEOUT,
                    read_timeout=API_READ_TIMEOUT, max_pool_connections=20)
                try:
                    client = session.client(service, endpoint_url=self.endpoint_url,
                                            config=config)
                except Exception as exc:
                    raise translate_error(exc, f"{self.what}: {service} client") from exc
                self._clients[service] = client
            return client

    def call(self, what, func, missing_ok=False, *, operation):
        """One rate-limited API call (``operation`` is the SDK method, for the metrics),
        retried with backoff while AWS throttles, answers 5xx or cannot be reached; errors come
        back as our classes naming ``what``."""
        attempts = len(self.retry_delays) + 1
        for attempt in range(attempts):
            with self.rate_limiter.call(operation):
                try:
                    return func()
                except Exception as exc:
                    cause = exc
                    error = translate_error(exc, f"{self.what}: {what}", missing_ok)
            if not is_retryable(error) or attempt == attempts - 1:
                raise error from cause
            self.log.info("%s: %s: retrying: %s", self.what, what, error)
            self.sleep(self.retry_delays[attempt])

    def ec2(self, what, method, missing_ok=False, **kwargs):
        client = self.client("ec2")
        return self.call(what, lambda: getattr(client, method)(**kwargs), missing_ok,
                         operation=method)

    def paginate(self, what, service, method, key, **kwargs):
        """Every item of a paginated call; one rate-limited call per page."""
        client = self.client(service)
        out = []
        token = None
        token_in, token_out = (("ContinuationToken", "NextContinuationToken")
                               if service == "s3" else ("NextToken", "NextToken"))
        while True:
            args = dict(kwargs)
            if token:
                args[token_in] = token
            page = self.call(what, lambda: getattr(client, method)(**args), operation=method)
            out.extend(page.get(key) or [])
            token = page.get(token_out)
            if not token:
                return out

    def stop(self):
        with self._client_lock:
            for name, client in self._clients.items():
                if name != "_session":
                    try:
                        client.close()
                    except Exception:
                        pass
            self._clients = {}


    # -- cached reads -----------------------------------------------------------------------------

    def _describe_instances(self):
        reservations = self.paginate("describe instances", "ec2", "describe_instances",
                                     "Reservations")
        return {i["InstanceId"]: i for r in reservations for i in r.get("Instances") or []}

    def instance_sizes(self, types):
        """(vcpus, ram MiB) per instance type, from one ``describe_instance_types`` for the
        types not seen yet.  An unknown type raises PermanentCloudError."""
        missing = sorted({t for t in types if t and t not in self._sizes})
        if missing:
            found = self.paginate(f"describe instance types {', '.join(missing)}", "ec2",
                                  "describe_instance_types", "InstanceTypes",
                                  InstanceTypes=missing)
            for item in found:
                self._sizes[item["InstanceType"]] = (
                    item.get("VCpuInfo", {}).get("DefaultVCpus", 0),
                    item.get("MemoryInfo", {}).get("SizeInMiB", 0))
            unknown = [t for t in missing if t not in self._sizes]
            if unknown:
                raise PermanentCloudError(f"{self.what}: unknown instance type(s) "
                                          f"{', '.join(unknown)}")
        return self._sizes

    def image_info(self, image_id):
        """``describe_images`` entry of one AMI (cached); PermanentCloudError if missing."""
        def fetch():
            try:
                images = self.ec2(f"describe image {image_id}", "describe_images", True,
                                  ImageIds=[image_id]).get("Images") or []
            except InstanceNotFound:
                return None
            return images[0] if images else None
        image = self._remember(("image", image_id), fetch)
        if image is None:
            self.forget(("image", image_id))
            raise InstanceNotFound(f"{self.what}: image {image_id} not found")
        return image

    def cloud_image_info(self, cloud_image, label_name=None):
        """The AMI of a ``cloud-images`` entry, by ``image-id`` or newest matching
        ``image-filters`` (cached); LabelConfigurationError when there is none."""
        opts = cloud_image.options
        subject = f"{self.what}: " + (f"label {label_name}: " if label_name else "") + \
            f"cloud image {cloud_image.name}"
        if opts.get("image-id"):
            try:
                return self.image_info(opts["image-id"])
            except InstanceNotFound:
                pass
            except PermanentCloudError as exc:
                raise LabelConfigurationError(f"{subject}: {exc}") from exc
            raise LabelConfigurationError(f"{subject}: image {opts['image-id']} not found")
        filters = [{"Name": f["name"], "Values": list(f["values"])}
                   for f in opts.get("image-filters") or []]
        key = ("filters", cloud_image.name, repr(filters))

        def fetch():
            return newest_image(self.paginate(f"find image {cloud_image.name}", "ec2",
                                              "describe_images", "Images", Filters=filters))
        image = self._remember(key, fetch)
        if image is None:
            self.forget(key)
            raise LabelConfigurationError(f"{subject}: no image matches image-filters "
                                          f"{filters}")
        return image

    def pool_uses_internal_ip(self, pool_name):
        pool = self.provider.pools.get(pool_name)
        return bool(pool and pool.options.get("use-internal-ip"))

    def instance_of(self, raw):
        meta = tag_dict(raw.get("Tags"))
        return instance_view(raw, self.region, self._sizes,
                             self.pool_uses_internal_ip(meta.get(META_POOL)))

    # -- adapter contract: instances ---------------------------------------------------------------

    def create_state_machine(self, spec):
        return CreateInstance(self, spec)

    def delete_state_machine(self, external_id):
        return DeleteInstance(self, external_id)

    def list_instances(self):
        listing = self.instances.get()
        types = {raw.get("InstanceType") for raw in listing.values()}
        try:
            self.instance_sizes(types)
        except CloudError as exc:
            self.log.warning("%s: sizes of listed instances unknown: %s", self.what, exc)
        return [self.instance_of(raw) for raw in listing.values()]

    def console_log(self, external_id):
        try:
            out = self.ec2(f"console output of {external_id}", "get_console_output",
                           InstanceId=external_id)
        except CloudError as exc:
            self.log.warning("%s: no console log for %s: %s", self.what, external_id, exc)
            return None
        return decode_console(out.get("Output"))

    def availability_zones(self):
        """Available AZs of the region, unless a pool pins one with ``availability-zone``
        or places instances by ``subnet-id`` (a subnet lives in one AZ): then ``[None]``."""
        for pool in self.provider.pools.values():
            if pool.options.get("availability-zone") or pool.options.get("subnet-id"):
                return [None]

        def fetch():
            zones = self.ec2("describe availability zones", "describe_availability_zones")
            return [z["ZoneName"] for z in zones.get("AvailabilityZones") or []
                    if z.get("State", "available") == "available"]
        return self._remember("azs", fetch) or [None]

    def label_ready(self, label):
        if not label.cloud_image:
            return True
        image = self.provider.cloud_images.get(label.cloud_image)
        if image is None:
            return False
        try:
            self.cloud_image_info(image)
        except PermanentCloudError:
            return False
        return True

    # -- quota -------------------------------------------------------------------------------------

    def quota_for_label(self, label):
        """What one node costs; a ``fleet`` label costs the most any of its types costs, per
        resource (the fleet may pick any of them)."""
        types = label_instance_types(label)
        if not types:
            raise LabelConfigurationError(f"{self.what}: label {label.name}: no instance-type")
        try:
            sizes = self.instance_sizes(types)
        except PermanentCloudError as exc:
            raise LabelConfigurationError(f"{self.what}: label {label.name}: instance type "
                                          f"of {', '.join(types)} is unknown: {exc}") from exc
        spot = bool(label.options.get("use-spot"))
        out = Resources()
        for itype in types:
            for key, value in instance_resources(itype, spot, sizes).items():
                out[key] = max(out.get(key, 0), value)
        return out

    def quota_limits(self):
        """Provider ``max-*`` keys combined with the account's vCPU service quotas of the
        instance families our labels use.  A quota the account cannot tell (Service Quotas
        unavailable, unknown code) counts as unlimited, logged once per code."""
        opts = self.provider.options
        limits = Limits.of(instances=opts.get("max-servers"), cores=opts.get("max-cores"),
                           ram=opts.get("max-ram"))
        for code, value in (opts.get("max-resources") or {}).items():
            limits[code] = min(limits[code], value)
        codes = {quota_code(itype, bool(lbl.options.get("use-spot")))
                 for lbl in self.provider.labels() for itype in label_instance_types(lbl)}
        for code in sorted(c for c in codes if c):
            value = self._service_quota(code)
            if value is not None:
                limits[code] = min(limits[code], value)
        return limits

    def _service_quota(self, code):
        client = self.client("service-quotas")
        try:
            answer = self.call(f"service quota {code}", lambda: client.get_service_quota(
                ServiceCode="ec2", QuotaCode=code), operation="get_service_quota")
        except PermanentCloudError as exc:
            if code not in self._quota_warned:
                self._quota_warned.add(code)
                self.log.warning("%s: service quota %s unknown, only max-* keys limit it: %s",
                                 self.what, code, exc)
            return None
        value = (answer.get("Quota") or {}).get("Value")
        return None if value is None else int(value)

    # -- leaks -------------------------------------------------------------------------------------

    def _our_filter(self):
        return [{"Name": f"tag:{META_PROVIDER}", "Values": [self.provider.name]}]

    def _our_images(self):
        return self.paginate("list our images", "ec2", "describe_images", "Images",
                             Owners=["self"], Filters=self._our_filter())

    def list_images(self):
        return [CloudResource("image", img["ImageId"], self._meta(tag_dict(img.get("Tags"))),
                              img.get("Name")) for img in self._our_images()]

    @staticmethod
    def _meta(tags):
        return {k: v for k, v in tags.items() if k.startswith("nodepool_")}

    def list_resources(self):
        """Volumes, snapshots and S3 objects tagged with our provider that may be leaks (see
        ``leak_candidates``), and our AMIs (type ``image``: the builder's to judge)."""
        images = self._our_images()
        live_uploads = set()
        live_snapshots = set()
        out = []
        for img in images:
            tags = tag_dict(img.get("Tags"))
            live_uploads.add((tags.get(META_BUILD_ID), tags.get(META_UPLOAD_ID)))
            for bdm in img.get("BlockDeviceMappings") or []:
                snap = (bdm.get("Ebs") or {}).get("SnapshotId")
                if snap:
                    live_snapshots.add(snap)
            out.append(CloudResource("image", img["ImageId"], self._meta(tags), img.get("Name")))
        items = []
        for vol in self.paginate("list our volumes", "ec2", "describe_volumes", "Volumes",
                                 Filters=self._our_filter()):
            if vol.get("State") == "in-use" and not tag_dict(vol.get("Tags")).get(META_NODE_ID):
                continue
            items.append((CloudResource("volume", vol["VolumeId"],
                                        self._meta(tag_dict(vol.get("Tags")))),
                          vol.get("CreateTime")))
        for snap in self.paginate("list our snapshots", "ec2", "describe_snapshots",
                                  "Snapshots", OwnerIds=["self"], Filters=self._our_filter()):
            items.append((CloudResource("snapshot", snap["SnapshotId"],
                                        self._meta(tag_dict(snap.get("Tags")))),
                          snap.get("StartTime")))
        if self.bucket:
            items.extend(self._our_objects())
        if self.uses_dedicated_hosts():
            items.extend(self._our_hosts())
        if any(lbl.options.get("fleet") for lbl in self.provider.labels()):
            for tmpl in self.paginate("list our launch templates", "ec2",
                                      "describe_launch_templates", "LaunchTemplates",
                                      Filters=self._our_filter()):
                items.append((CloudResource("launch-template", tmpl["LaunchTemplateId"],
                                            self._meta(tag_dict(tmpl.get("Tags"))),
                                            tmpl.get("LaunchTemplateName")),
                              tmpl.get("CreateTime")))
        now = datetime.datetime.now(datetime.timezone.utc)
        out.extend(leak_candidates(items, live_uploads, live_snapshots, now,
                                   self.upload_grace))
        return out

    def _our_hosts(self):
        """(CloudResource, allocated) of dedicated hosts tagged with our provider that are not
        released (filtered here: not every endpoint filters hosts by tag)."""
        items = []
        for host in self.paginate("list dedicated hosts", "ec2", "describe_hosts", "Hosts"):
            tags = tag_dict(host.get("Tags"))
            if tags.get(META_PROVIDER) != self.provider.name or \
                    host.get("State") in ("released", "released-permanent-failure"):
                continue
            items.append((CloudResource("host", host["HostId"], self._meta(tags)),
                          host.get("AllocationTime")))
        return items

    def uses_dedicated_hosts(self):
        """Whether a label of this provider asks for dedicated hosts (only then are hosts
        described and released: other accounts may lack those permissions)."""
        return any(lbl.options.get("dedicated-host") for lbl in self.provider.labels())

    def our_host(self, host_id):
        """Whether ``host_id`` is a dedicated host this provider allocated (tagged by us)."""
        try:
            hosts = self.ec2(f"describe host {host_id}", "describe_hosts", True,
                             HostIds=[host_id]).get("Hosts") or []
        except InstanceNotFound:
            return False
        return any(tag_dict(h.get("Tags")).get(META_PROVIDER) == self.provider.name
                   for h in hosts)

    def release_host(self, host_id):
        answer = self.ec2(f"release dedicated host {host_id}", "release_hosts", True,
                          HostIds=[host_id])
        failed = answer.get("Unsuccessful") or []
        if failed:
            error = (failed[0].get("Error") or {})
            message = f"{error.get('Code', '')} {error.get('Message', '')}".strip()
            if "not found" in message.lower() or "InvalidHostID" in message:
                return
            raise TransientCloudError(f"{self.what}: dedicated host {host_id} not released: "
                                      f"{message or 'no reason given'}")
        self.log.info("%s: released dedicated host %s", self.what, host_id)

    def _our_objects(self):
        """(CloudResource, last modified) of S3 objects tagged with our provider.  A missing
        bucket is logged, not raised: volumes and snapshots are still worth cleaning."""
        s3 = self.client("s3")
        items = []
        try:
            objects = self.paginate("list our objects", "s3", "list_objects_v2", "Contents",
                                    Bucket=self.bucket, Prefix=self._object_prefix())
        except PermanentCloudError as exc:
            self.log.warning("%s: S3 objects not checked for leaks: %s", self.what, exc)
            return items
        for obj in objects:
            key = obj["Key"]
            try:
                tagging = self.call(f"tags of object {key}",
                                    lambda k=key: s3.get_object_tagging(Bucket=self.bucket,
                                                                        Key=k),
                                    missing_ok=True, operation="get_object_tagging")
            except InstanceNotFound:
                continue
            tags = tag_dict(tagging.get("TagSet"))
            if tags.get(META_PROVIDER) != self.provider.name:
                continue
            items.append((CloudResource("object", key, self._meta(tags), key),
                          obj.get("LastModified")))
        return items

    def delete_resource(self, resource):
        what = f"delete {resource.type} {resource.id}"
        try:
            if resource.type == "instance":
                self.ec2(what, "terminate_instances", True, InstanceIds=[resource.id])
                self.instances.invalidate()
            elif resource.type == "volume":
                self.ec2(what, "delete_volume", True, VolumeId=resource.id)
            elif resource.type == "snapshot":
                self.ec2(what, "delete_snapshot", True, SnapshotId=resource.id)
            elif resource.type == "image":
                self.delete_image(resource.id)
            elif resource.type == "host":
                self.release_host(resource.id)
            elif resource.type == "launch-template":
                self.ec2(what, "delete_launch_template", True, LaunchTemplateId=resource.id)
            elif resource.type == "object":
                s3 = self.client("s3")
                self.call(what, lambda: s3.delete_object(Bucket=self.bucket, Key=resource.id),
                          missing_ok=True, operation="delete_object")
            else:
                raise PermanentCloudError(f"{self.what}: cannot delete a {resource.type}")
        except InstanceNotFound:
            pass

    # -- images ------------------------------------------------------------------------------------

    def _object_prefix(self):
        return f"nodepool/{self.provider.name}/"

    def object_key(self, image_name, image_format=None, metadata=None):
        """The S3 key an upload stages its file under.  With the upload's metadata the key
        carries its build and upload ids, so two uploads whose image names collide (same
        second) never share, and then delete, one object."""
        ids = [str(metadata[k]) for k in (META_BUILD_ID, META_UPLOAD_ID)
               if metadata and metadata.get(k)]
        name = "-".join([image_name] + ids)
        return f"{self._object_prefix()}{name}.{image_format or self.image_format}"

    def upload_image(self, spec):
        """Stage the file in S3, make an EBS snapshot of it and register an AMI; every piece
        carries the upload's metadata.  Blocking (builder upload thread)."""
        from .images import ImageUpload
        return ImageUpload(self, spec).run()

    def delete_image(self, external_id):
        """Deregister the AMI, delete its snapshots and its staged S3 object."""
        try:
            images = self.ec2(f"describe image {external_id}", "describe_images", True,
                              ImageIds=[external_id]).get("Images") or []
        except InstanceNotFound:
            images = []
        self.forget(("image", external_id))
        if not images:
            return
        image = images[0]
        self.ec2(f"deregister image {external_id}", "deregister_image", True,
                 ImageId=external_id)
        snapshots = {(bdm.get("Ebs") or {}).get("SnapshotId")
                     for bdm in image.get("BlockDeviceMappings") or []}
        tags = tag_dict(image.get("Tags"))
        if tags.get(META_UPLOAD_ID) and tags.get(META_PROVIDER) == self.provider.name:
            # the snapshot we made for it, even if the AMI does not name it
            snapshots.update(s["SnapshotId"] for s in self.paginate(
                f"snapshots of image {external_id}", "ec2", "describe_snapshots", "Snapshots",
                OwnerIds=["self"], Filters=self._our_filter() + [
                    {"Name": f"tag:{META_UPLOAD_ID}", "Values": [tags[META_UPLOAD_ID]]},
                    {"Name": f"tag:{META_BUILD_ID}", "Values": [tags.get(META_BUILD_ID, "")]}]))
        for snap in sorted(s for s in snapshots if s):
            if snap:
                try:
                    self.ec2(f"delete snapshot {snap} of image {external_id}",
                             "delete_snapshot", True, SnapshotId=snap)
                except InstanceNotFound:
                    pass
        if self.bucket and image.get("Name"):
            s3 = self.client("s3")
            key = self.object_key(image["Name"], metadata=tags)
            try:
                self.call(f"delete object {key}", lambda: s3.delete_object(
                    Bucket=self.bucket, Key=key), missing_ok=True, operation="delete_object")
            except InstanceNotFound:
                pass
        self.log.info("%s: deleted image %s (%s)", self.what, external_id, image.get("Name"))


def label_instance_types(label):
    """The instance types a label may launch: its ``instance-type`` or its fleet's types."""
    opts = label.options
    if opts.get("instance-type"):
        return [opts["instance-type"]]
    return list((opts.get("fleet") or {}).get("instance-types") or [])


def launch_template_data(kwargs):
    """The ``create_launch_template`` data of ``run_instances`` arguments (a fleet launches
    from a template; the instance type is the fleet's choice).  Launch templates take user
    data base64-encoded, ``run_instances`` encodes it itself."""
    data = {k: val for k, val in kwargs.items()
            if k not in ("MinCount", "MaxCount", "InstanceType", "ClientToken",
                         "InstanceMarketOptions")}
    if "UserData" in data:
        data["UserData"] = base64.b64encode(data["UserData"].encode()).decode()
    if "IamInstanceProfile" in data:
        data["IamInstanceProfile"] = dict(data["IamInstanceProfile"])
    return data


def fleet_arguments(kwargs, fleet, spot, template_id):
    """``create_fleet`` arguments of an instant fleet of one instance."""
    market = "spot" if spot else "on-demand"
    out = dict(Type="instant", ClientToken=kwargs["ClientToken"],
               TargetCapacitySpecification={"TotalTargetCapacity": 1,
                                            "DefaultTargetCapacityType": market},
               LaunchTemplateConfigs=[{
                   "LaunchTemplateSpecification": {"LaunchTemplateId": template_id,
                                                   "Version": "$Latest"},
                   "Overrides": [{"InstanceType": t} for t in fleet["instance-types"]]}],
               TagSpecifications=[t for t in kwargs.get("TagSpecifications") or []
                                  if t["ResourceType"] == "instance"])
    options = {"AllocationStrategy": fleet["allocation-strategy"]}
    if spot:
        out["SpotOptions"] = options
    else:
        out["OnDemandOptions"] = options
    return out


def client_token(node_id):
    """The ``run_instances`` idempotency token of one create state machine (one launch
    attempt): EC2 answers a repeated call with the same token with the instance the first call
    made, so retrying a call whose answer was lost (read timeout) launches nothing more.  The
    node id names it; the random part keeps attempts apart (a new attempt must launch anew)
    and so are installations whose node ids overlap in one account."""
    return f"np{node_id or 'none'}-{uuid.uuid4().hex}"[:64]


class CreateInstance(StateMachine):
    """run_instances → ``running`` in the shared listing → Instance."""

    CREATING = "instance creating"

    def __init__(self, adapter, spec):
        super().__init__()
        self.adapter = adapter
        self.spec = spec
        self.created_at = None
        self.client_token = client_token(spec.node_id)
        self.host_id = None             # dedicated host allocated for this launch

    def _what(self):
        return f"{self.adapter.what}: node {self.spec.node_id}"

    def advance(self):
        if self.state == self.START:
            self._run()
            return None
        if self.state == self.CREATING:
            raw = self.adapter.instances.get(after=self.created_at).get(self.external_id)
            if raw is None:
                if time.monotonic() - self.created_at > NOT_LISTED_GRACE:
                    raise TransientCloudError(f"{self._what()}: instance {self.external_id} "
                                              f"not listed {NOT_LISTED_GRACE}s after launch")
                return None
            state = (raw.get("State") or {}).get("Name")
            if state == "pending":
                return None
            if state == "running":
                return self._done(raw)
            reason = raw.get("StateReason") or {}
            text = f"{reason.get('Code', '')} {reason.get('Message', '')}".strip()
            if "capacity" in text.lower() or "InstanceLimitExceeded" in text:
                raise QuotaError(f"{self._what()}: instance {self.external_id} is {state}: "
                                 f"{text}")
            raise TransientCloudError(f"{self._what()}: instance {self.external_id} is {state} "
                                      f"while booting: {text or 'no reason given'}")
        return None

    def _image(self):
        adapter, spec = self.adapter, self.spec
        label = spec.label
        if spec.image_external_id:
            try:
                return adapter.image_info(spec.image_external_id)
            except InstanceNotFound as exc:
                raise PermanentCloudError(f"{self._what()}: label {label.name}: uploaded "
                                          f"image {spec.image_external_id} of diskimage "
                                          f"{label.diskimage} not found") from exc
        cloud_image = adapter.provider.cloud_images.get(label.cloud_image)
        if cloud_image is None:
            raise LabelConfigurationError(f"{self._what()}: label {label.name}: cloud image "
                                          f"{label.cloud_image!r} is not configured")
        return adapter.cloud_image_info(cloud_image, f"{label.name} (node {spec.node_id})")

    def run_arguments(self, image):
        """The ``run_instances`` arguments for this launch (pure but for the spec)."""
        spec = self.spec
        opts, pool_opts = spec.label.options, spec.pool.options
        tags = instance_tags(spec.hostname, spec.label.name, opts, spec.metadata, spec.request)
        kwargs = dict(ImageId=image["ImageId"], MinCount=1, MaxCount=1,
                      InstanceType=opts.get("instance-type"), ClientToken=self.client_token,
                      TagSpecifications=tag_specifications(tags, "instance", "volume"))
        if opts.get("key-name"):
            kwargs["KeyName"] = opts["key-name"]
        if opts.get("ebs-optimized"):
            kwargs["EbsOptimized"] = True
        if opts.get("userdata"):
            kwargs["UserData"] = opts["userdata"]
        profile = opts.get("iam-instance-profile") or {}
        if profile.get("arn"):
            kwargs["IamInstanceProfile"] = {"Arn": profile["arn"]}
        elif profile.get("name"):
            kwargs["IamInstanceProfile"] = {"Name": profile["name"]}
        if opts.get("use-spot") and not opts.get("fleet"):
            kwargs["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "one-time",
                                "InstanceInterruptionBehavior": "terminate"}}
        if opts.get("imdsv2") == "required":
            kwargs["MetadataOptions"] = {"HttpTokens": "required", "HttpEndpoint": "enabled"}
        elif opts.get("imdsv2") == "optional":
            kwargs["MetadataOptions"] = {"HttpTokens": "optional", "HttpEndpoint": "enabled"}
        subnet, group = pool_opts.get("subnet-id"), pool_opts.get("security-group-id")
        public4 = pool_opts.get("public-ipv4", True)
        public6 = pool_opts.get("public-ipv6", False)
        if subnet or not public4 or public6:
            nic = {"DeviceIndex": 0, "AssociatePublicIpAddress": bool(public4),
                   "DeleteOnTermination": True}
            if subnet:
                nic["SubnetId"] = subnet
            if group:
                nic["Groups"] = [group]
            if public6:
                nic["Ipv6AddressCount"] = 1
            kwargs["NetworkInterfaces"] = [nic]
        elif group:
            kwargs["SecurityGroupIds"] = [group]
        az = pool_opts.get("availability-zone") or (None if subnet else spec.az)
        if az:
            kwargs["Placement"] = {"AvailabilityZone": az}
        if self.host_id:
            kwargs["Placement"] = {"AvailabilityZone": pool_opts.get("availability-zone"),
                                   "HostId": self.host_id, "Tenancy": "host"}
        ebs = {}
        if opts.get("volume-size"):
            ebs["VolumeSize"] = opts["volume-size"]
        if opts.get("volume-type"):
            ebs["VolumeType"] = opts["volume-type"]
        if opts.get("iops"):
            ebs["Iops"] = opts["iops"]
        if opts.get("throughput"):
            ebs["Throughput"] = opts["throughput"]
        if ebs:
            ebs["DeleteOnTermination"] = True
            kwargs["BlockDeviceMappings"] = [{
                "DeviceName": image.get("RootDeviceName") or "/dev/sda1", "Ebs": ebs}]
        return kwargs

    def _run(self):
        adapter, spec = self.adapter, self.spec
        opts = spec.label.options
        if not label_instance_types(spec.label):
            raise LabelConfigurationError(f"{self._what()}: label {spec.label.name}: no "
                                          f"instance-type")
        image = self._image()
        if opts.get("fleet"):
            self._run_fleet(image)
            return
        if opts.get("dedicated-host"):
            self._allocate_host()
        kwargs = self.run_arguments(image)
        self.created_at = time.monotonic()
        try:
            result = adapter.ec2(f"node {spec.node_id}: run instance {spec.hostname} "
                                 f"({kwargs['InstanceType']}, {kwargs['ImageId']})",
                                 "run_instances", **kwargs)
        except BaseException:
            self._release_host()
            raise
        self.external_id = result["Instances"][0]["InstanceId"]
        self.state = self.CREATING
        log.info("%s: instance %s launched (%s, %s%s%s)", self._what(), self.external_id,
                 kwargs["InstanceType"], kwargs["ImageId"],
                 ", spot" if "InstanceMarketOptions" in kwargs else "",
                 f", dedicated host {self.host_id}" if self.host_id else "")

    def _allocate_host(self):
        """A dedicated host of the label's instance type in the pool's AZ, tagged like the
        instance (so leak cleanup finds it if this launch dies before the instance exists)."""
        spec = self.spec
        tags = instance_tags(spec.hostname, spec.label.name, spec.label.options, spec.metadata,
                             spec.request)
        answer = self.adapter.ec2(
            f"node {spec.node_id}: allocate dedicated host", "allocate_hosts",
            AvailabilityZone=spec.pool.options.get("availability-zone"),
            InstanceType=spec.label.options["instance-type"], Quantity=1,
            TagSpecifications=tag_specifications(tags, "dedicated-host"))
        self.host_id = (answer.get("HostIds") or [None])[0]
        if not self.host_id:
            raise QuotaError(f"{self._what()}: no dedicated host allocated")

    def _release_host(self):
        if not self.host_id:
            return
        try:
            self.adapter.release_host(self.host_id)
        except CloudError as exc:
            log.warning("%s: dedicated host %s of a failed launch not released (leak cleanup "
                        "will): %s", self._what(), self.host_id, exc)

    def _run_fleet(self, image):
        """An instant EC2 fleet of one instance from a launch template made for this launch
        (deleted again at once: an instant fleet does not need it afterwards)."""
        adapter, spec = self.adapter, self.spec
        opts = spec.label.options
        kwargs = self.run_arguments(image)
        tags = instance_tags(spec.hostname, spec.label.name, opts, spec.metadata, spec.request)
        name = f"nodepool-{self.client_token}"[:128]
        template = adapter.ec2(f"node {spec.node_id}: create launch template",
                               "create_launch_template", LaunchTemplateName=name,
                               LaunchTemplateData=launch_template_data(kwargs),
                               TagSpecifications=tag_specifications(tags, "launch-template"))
        template_id = template["LaunchTemplate"]["LaunchTemplateId"]
        self.created_at = time.monotonic()
        try:
            types = ", ".join(opts["fleet"]["instance-types"])
            result = adapter.ec2(
                f"node {spec.node_id}: create fleet ({types})", "create_fleet",
                **fleet_arguments(kwargs, opts["fleet"], bool(opts.get("use-spot")),
                                  template_id))
        finally:
            try:
                adapter.ec2(f"node {spec.node_id}: delete launch template {template_id}",
                            "delete_launch_template", True, LaunchTemplateId=template_id)
            except CloudError as exc:
                log.warning("%s: launch template %s not deleted (leak cleanup will): %s",
                            self._what(), template_id, exc)
        ids = [i for group in result.get("Instances") or []
               for i in group.get("InstanceIds") or []]
        if not ids:
            errors = result.get("Errors") or []
            text = "; ".join(f"{e.get('ErrorCode', '')} {e.get('ErrorMessage', '')}".strip()
                             for e in errors) or "no instance and no reason given"
            if any(code in text for code in ("InsufficientInstanceCapacity", "capacity",
                                             "LimitExceeded", "MaxSpotInstanceCountExceeded")):
                raise QuotaError(f"{self._what()}: fleet launched no instance: {text}")
            raise TransientCloudError(f"{self._what()}: fleet launched no instance: {text}")
        self.external_id = ids[0]
        self.state = self.CREATING
        log.info("%s: instance %s launched by fleet %s (%s)", self._what(), self.external_id,
                 result.get("FleetId"), kwargs["ImageId"])

    def _done(self, raw):
        adapter, label = self.adapter, self.spec.label
        try:
            adapter.instance_sizes([raw.get("InstanceType")])
        except CloudError as exc:
            log.warning("%s: size of %s unknown: %s", self._what(), raw.get("InstanceType"), exc)
        inst = instance_view(raw, adapter.region, adapter._sizes,
                             bool(self.spec.pool.options.get("use-internal-ip")))
        apply_image_access(inst, adapter.provider, label)
        if label.diskimage:
            # the provider's diskimage entry may name another login than the diskimage's
            image = adapter.provider.diskimages.get(label.diskimage)
            for key, attr in (("username", "username"), ("python-path", "python_path"),
                              ("shell-type", "shell_type")):
                if image is not None and image.options.get(key) is not None:
                    setattr(inst, attr, image.options[key])
        self.complete = True
        return inst


class DeleteInstance(StateMachine):
    """terminate → ``terminated`` (or gone) in the shared listing → delete volumes left behind."""

    TERMINATING = "terminating"

    def __init__(self, adapter, external_id):
        super().__init__()
        self.adapter = adapter
        self.external_id = external_id
        self.terminated_at = None
        self.volumes = []
        self.host_id = None          # the dedicated host it ran on, released once it is gone

    def advance(self):
        adapter = self.adapter
        if self.state == self.START:
            raw = adapter.instances.get().get(self.external_id)
            if raw is None:
                # the cached listing may predate the instance: confirm with a fresh one
                raw = adapter.instances.get(after=time.monotonic()).get(self.external_id)
            if raw is None or (raw.get("State") or {}).get("Name") == "terminated":
                self.complete = True
                return True
            self.volumes = [(b.get("Ebs") or {}).get("VolumeId")
                            for b in raw.get("BlockDeviceMappings") or []]
            self.volumes = [v for v in self.volumes if v]
            self.host_id = (raw.get("Placement") or {}).get("HostId")
            self.terminated_at = time.monotonic()
            try:
                adapter.ec2(f"terminate instance {self.external_id}", "terminate_instances",
                            True, InstanceIds=[self.external_id])
            except InstanceNotFound:
                self.complete = True
                return True
            self.state = self.TERMINATING
            return None
        if self.state == self.TERMINATING:
            raw = adapter.instances.get(after=self.terminated_at).get(self.external_id)
            if raw is not None and (raw.get("State") or {}).get("Name") != "terminated":
                return None
            if not self._delete_volumes():
                return None
            if self.host_id and adapter.uses_dedicated_hosts() and \
                    adapter.our_host(self.host_id):
                adapter.release_host(self.host_id)
            self.complete = True
            return True
        return None

    def _delete_volumes(self):
        """Delete the instance's volumes that outlived it; True when none is left."""
        if not self.volumes:
            return True
        adapter = self.adapter
        vols = adapter.ec2(f"volumes of terminated instance {self.external_id}",
                           "describe_volumes",
                           Filters=[{"Name": "volume-id", "Values": self.volumes}])
        left = []
        for vol in vols.get("Volumes") or []:
            if vol.get("State") == "available":
                try:
                    adapter.ec2(f"delete volume {vol['VolumeId']} of {self.external_id}",
                                "delete_volume", True, VolumeId=vol["VolumeId"])
                    log.info("%s: deleted volume %s left by %s", adapter.what, vol["VolumeId"],
                             self.external_id)
                except InstanceNotFound:
                    pass
            elif vol.get("State") in ("in-use", "creating"):
                left.append(vol["VolumeId"])
        self.volumes = left
        return not left
