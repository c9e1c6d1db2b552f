"""The simulated driver's adapter: the client side of ``cloud.SimulatedCloud``.

Every API call goes through ``_api``: it takes the provider's rate limiter, pays ``api-latency``
and fails with ``api-error-rate`` like a 5xx would, so a provider can model a slow or flaky cloud;
with ``count-api-calls`` it is also counted in the cloud's state file, where the calls of every
process using the provider add up (``SimulatedCloud.api_call_counts``).
Launch and delete machines make at most one API call per ``advance()``.  Machines waiting for a
boot or a delete do not ask about their own instance: they read one shared instance listing that
is refreshed lazily at most once per ``list_interval``, so a hundred launches in flight cost one
list call per interval, as with real drivers.
"""
import hashlib
import logging
import os
import random
import threading
import time
from collections import Counter

from ...errors import InstanceNotFound, PermanentCloudError, TransientCloudError
from ...model.quota import Limits, Resources
from ..base import Adapter, CloudResource, Instance, StateMachine
from . import cloud as simcloud

log = logging.getLogger("nodepool.drivers.simulated")

DEFAULT_AZS = ["sim-a", "sim-b"]
CLOUD_NAME = "simulated"
NODEPOOL_META_PREFIX = "nodepool_"


def list_interval_for(boot_time, delete_time):
    """How long a shared instance listing stays fresh: a fraction of the shortest wait, so a fast
    simulated cloud is not slowed by its own cache, but never more than half a second."""
    waits = [t for t in (boot_time, delete_time) if t > 0]
    if not waits:
        return 0.1
    return min(0.5, max(0.05, min(waits) / 4))


class SimulatedCreate(StateMachine):
    """Create one instance: one create call, then watch the shared listing until ACTIVE."""

    BUILDING = "building"
    DONE = "done"

    def __init__(self, adapter, spec):
        super().__init__()
        self.adapter = adapter
        self.spec = spec
        self.created_at = None       # monotonic time the create call returned
        self.result = None

    def advance(self):
        if self.state == self.START:
            inst = self.adapter._create_instance(self.spec)
            self.external_id = inst.id
            self.created_at = time.monotonic()
            self.state = self.BUILDING
            return self._check(inst)
        if self.state == self.BUILDING:
            taken_at, view = self.adapter._instance_view()
            if taken_at < self.created_at:
                return None          # the listing predates our create: wait for a newer one
            inst = view.get(self.external_id)
            if inst is None:
                raise PermanentCloudError(f"instance {self.external_id} disappeared while "
                                          f"booting on {self.adapter.provider.name}")
            return self._check(inst)
        return self.result

    def _check(self, inst):
        if inst.status == simcloud.ERROR:
            raise PermanentCloudError(f"instance {inst.id} on {self.adapter.provider.name} "
                                      "went to ERROR")
        if inst.status == simcloud.DELETING:
            raise PermanentCloudError(f"instance {inst.id} on {self.adapter.provider.name} "
                                      "was deleted while booting")
        if inst.status != simcloud.ACTIVE:
            return None
        self.state = self.DONE
        self.complete = True
        self.result = self.adapter._to_instance(inst)
        return self.result


class SimulatedDelete(StateMachine):
    """Delete one instance: one delete call, then watch the shared listing until it is gone."""

    DELETING = "deleting"

    def __init__(self, adapter, external_id):
        super().__init__()
        self.adapter = adapter
        self.external_id = external_id
        self.requested_at = None

    def advance(self):
        if self.state == self.START:
            outcome = self.adapter._api("delete", self.adapter.cloud.delete_instance,
                                        self.external_id)
            self.requested_at = time.monotonic()
            self.state = self.DELETING
            if outcome in ("missing", "deleted"):
                self.complete = True
                return True
            return None
        if self.complete:
            return True
        taken_at, view = self.adapter._instance_view()
        if taken_at < self.requested_at or self.external_id in view:
            return None
        self.complete = True
        return True


class SimulatedAdapter(Adapter):
    """One provider of the simulated driver (see the module docstring)."""

    def __init__(self, provider, rate_limiter=None):
        super().__init__(provider, rate_limiter)
        opts = provider.options
        self.state_file = opts.get("state-file")
        self.api_latency = float(opts.get("api-latency", 0.0))
        self.api_error_rate = float(opts.get("api-error-rate", 0.0))
        self.upload_time = float(opts.get("upload-time", 0.0))
        self.count_api_calls = bool(opts.get("count-api-calls", False))
        self.failing_images = dict(opts.get("boot-failure-images") or {})
        self.interface_ip = opts.get("interface-ip")
        boot_time = float(opts.get("boot-time", 1.0))
        delete_time = float(opts.get("delete-time", 0.0))
        seed = opts.get("seed")
        self.rng = random.Random(seed) if seed is not None else random.Random()
        self.list_interval = list_interval_for(boot_time, delete_time)
        self._view_cost = 0.0
        self.api_calls = Counter()        # API calls made, by operation (for tests and bench)
        self.list_errors = 0              # failed refreshes of the shared instance listing
        self._cloud = None
        self._cloud_args = dict(boot_time=boot_time, delete_time=delete_time,
                                boot_failure_rate=float(opts.get("boot-failure-rate", 0.0)),
                                quota=dict(opts.get("quota") or {}), rng=self.rng)
        self._view_lock = threading.Lock()
        self._view = {}
        self._view_taken_at = float("-inf")      # monotonic start of the cached listing
        self._view_tried_at = float("-inf")      # monotonic start of the last listing attempt
        self._converted = {}      # id -> (CloudInstance, Instance) of the last listing

    @property
    def cloud(self):
        """The ``SimulatedCloud`` behind the state file (tests use it to inspect and meddle)."""
        if self._cloud is None:
            if not self.state_file:
                raise PermanentCloudError(f"provider {self.provider.name}: the simulated driver "
                                          "needs a state-file")
            self._cloud = simcloud.SimulatedCloud(self.state_file, **self._cloud_args)
        return self._cloud

    def start(self):
        self.cloud._connection()

    def stop(self):
        if self._cloud is not None:
            self._cloud.close()

    # -- API plumbing ----------------------------------------------------------------------------

    def _api(self, operation, func, *args, **kwargs):
        """One API call: rate limit, latency, injected 5xx, then the cloud's answer."""
        with self.rate_limiter.call(operation):
            self.api_calls[operation] += 1
            if self.api_latency:
                time.sleep(self.api_latency)
            failed = bool(self.api_error_rate) and self.rng.random() < self.api_error_rate
            if self.count_api_calls:
                self.cloud.record_api_call(operation, failed)
            if failed:
                raise TransientCloudError(
                    f"simulated cloud {self.provider.name}: {operation} failed: "
                    f"503 Service Unavailable (api-error-rate {self.api_error_rate})")
            return func(*args, **kwargs)

    def _instance_view(self):
        """``(taken_at, {id: CloudInstance})``: the shared listing, refreshed by at most one list
        call per ``list_interval``.

        A failed refresh belongs to no single launch, so it is logged and the old listing kept:
        the machines keep waiting and the next interval tries again (launch and delete timeouts
        bound an outage).  Failed attempts also wait an interval, so errors do not multiply."""
        with self._view_lock:
            started = time.monotonic()
            # a listing of thousands of instances is not free: list again no sooner than four
            # times what the last one took (when that is noticeable), so watching a large
            # fleet boot takes a bounded share of the process (the launcher's loop shares it)
            wait = self.list_interval
            if self._view_cost > 0.01:
                wait = max(wait, 4 * self._view_cost)
            if started - self._view_tried_at >= wait:
                self._view_tried_at = started
                try:
                    self._store_view(started, self._api("list", self.cloud.list_instances,
                                                        shared=True))     # only read
                except TransientCloudError as exc:
                    self.list_errors += 1
                    log.warning("provider %s: instance listing failed, keeping the last one: "
                                "%s", self.provider.name, exc)
                self._view_cost = time.monotonic() - started
            return self._view_taken_at, self._view

    def _store_view(self, taken_at, instances):
        if taken_at >= self._view_taken_at:
            self._view = {inst.id: inst for inst in instances}
            self._view_taken_at = taken_at

    def _resolve_image(self, spec):
        """``(image_id, uploaded)`` for a launch; a missing cloud image is a permanent error."""
        if spec.image_external_id:
            return spec.image_external_id, True
        label = spec.label
        name = label.cloud_image
        image = self.provider.cloud_images.get(name) if name else None
        if image is None:
            raise PermanentCloudError(f"label {label.name} on provider {self.provider.name}: "
                                      f"no cloud image {name!r} and no uploaded image to boot")
        if not image.options.get("exists", True):
            raise PermanentCloudError(f"cloud image {name} (label {label.name}) does not exist "
                                      f"in simulated cloud {self.provider.name}")
        return image.options.get("image-id") or name, False

    def _create_instance(self, spec):
        image_id, uploaded = self._resolve_image(spec)
        cost = self.quota_for_label(spec.label)
        az = spec.az or self.rng.choice(spec.pool.azs or DEFAULT_AZS)
        rate = self.failing_images.get(image_id)
        fails = None if rate is None else self.rng.random() < rate
        return self._api("create", self.cloud.create_instance, spec.hostname,
                         cores=cost["cores"], ram=cost["ram"], metadata=dict(spec.metadata),
                         image_id=image_id, uploaded_image=uploaded, az=az, fails=fails)

    def _to_instance(self, inst):
        return Instance(
            external_id=inst.id, metadata=dict(inst.metadata),
            ready=inst.status == simcloud.ACTIVE, deleted=inst.status == simcloud.DELETING,
            failed=inst.status == simcloud.ERROR,
            interface_ip=self.interface_ip or inst.public_ipv4,
            public_ipv4=inst.public_ipv4, private_ipv4=inst.private_ipv4,
            public_ipv6=inst.public_ipv6, cloud=CLOUD_NAME, region=inst.region, az=inst.az,
            host_id=inst.host_id, resources=inst.resources, host_keys=list(inst.host_keys))

    # -- the adapter contract --------------------------------------------------------------------

    def create_state_machine(self, spec):
        return SimulatedCreate(self, spec)

    def delete_state_machine(self, external_id):
        return SimulatedDelete(self, external_id)

    def list_instances(self):
        started = time.monotonic()
        instances = self._api("list", self.cloud.list_instances, shared=True)
        with self._view_lock:
            self._store_view(started, instances)
        # the leak scan lists a fleet that mostly did not change since its last listing: an
        # instance the cloud hands out as the same object as last time (it did not change) is
        # converted once, then copied
        known, converted, out = self._converted, {}, []
        for inst in instances:
            seen = known.get(inst.id)
            if seen is None or seen[0] is not inst:
                seen = (inst, self._to_instance(inst))
            converted[inst.id] = seen
            out.append(_instance_copy(seen[1]))
        self._converted = converted
        return out

    def list_resources(self):
        return self.list_images()

    def delete_resource(self, resource):
        if resource.type == "image":
            self.delete_image(resource.id)
        elif resource.type == "instance":
            self._api("delete", self.cloud.delete_instance, resource.id)
        else:
            raise PermanentCloudError(f"simulated cloud {self.provider.name} has no "
                                      f"{resource.type} resources ({resource.id})")

    def quota_limits(self):
        return Limits.of(**(self.provider.options.get("quota") or {}))

    def quota_for_label(self, label):
        return Resources.of(instances=1, cores=int(label.options.get("cores", 1)),
                            ram=int(label.options.get("ram", 1024)))

    def availability_zones(self):
        return list(DEFAULT_AZS)

    def label_ready(self, label):
        if not label.cloud_image:
            return True
        image = self.provider.cloud_images.get(label.cloud_image)
        return image is not None and bool(image.options.get("exists", True))

    def upload_image(self, spec):
        """Checksum the file, register the image, take ``upload-time``, mark it active."""
        name = spec.image_name
        try:
            size = os.path.getsize(spec.filename)
        except OSError as exc:
            raise PermanentCloudError(f"image {name}: cannot read {spec.filename}: "
                                      f"{exc.strerror}") from exc
        if size == 0:
            raise PermanentCloudError(f"image {name}: file {spec.filename} is empty")
        md5, sha256 = file_checksums(spec.filename)
        for kind, expected, actual in (("md5", spec.md5, md5), ("sha256", spec.sha256, sha256)):
            if expected and expected != actual:
                raise PermanentCloudError(f"image {name}: {kind} of {spec.filename} is {actual}, "
                                          f"expected {expected}")
        image = self._api("upload", self.cloud.create_image, name,
                          image_format=spec.image_format, size=size, md5=md5, sha256=sha256,
                          metadata=dict(spec.metadata))
        if self.upload_time:
            time.sleep(self.upload_time)
        if not self._api("upload", self.cloud.set_image_status, image.id, simcloud.IMAGE_ACTIVE):
            raise TransientCloudError(f"image {name} ({image.id}) was deleted during upload "
                                      f"to {self.provider.name}")
        log.info("uploaded %s (%s, %d bytes) to %s as %s", spec.filename, spec.image_format,
                 size, self.provider.name, image.id)
        return image.id

    def delete_image(self, external_id):
        self._api("delete image", self.cloud.delete_image, external_id)

    def list_images(self):
        images = self._api("list images", self.cloud.list_images)
        return [CloudResource(type="image", id=img.id, metadata=dict(img.metadata),
                              name=img.name)
                for img in images
                if any(key.startswith(NODEPOOL_META_PREFIX) for key in img.metadata)]

    def console_log(self, external_id):
        inst = self._api("console", self.cloud.get_instance, external_id)
        if inst is None:
            raise InstanceNotFound(f"instance {external_id} not found on {self.provider.name}")
        lines = [f"[    0.000000] Linux version 6.1.0-sim (simulated cloud {self.provider.name})",
                 "[    0.000000] Command line: root=LABEL=cloudimg-rootfs console=ttyS0",
                 "[    1.204311] EXT4-fs (vda1): mounted filesystem with ordered data mode"]
        if inst.status in (simcloud.ACTIVE, simcloud.DELETING):
            lines += [f"cloud-init: hostname set to {inst.name}",
                      f"cloud-init: ci-info: eth0 {inst.private_ipv4} {inst.public_ipv6}",
                      f"{inst.name} login:"]
        elif inst.status == simcloud.ERROR:
            lines.append("Kernel panic - not syncing: VFS: Unable to mount root fs")
        return "\n".join(lines) + "\n"


def _instance_copy(inst):
    """A copy of an ``Instance`` whose containers the caller may change."""
    new = object.__new__(Instance)
    attrs = inst.__dict__.copy()
    for key in ("metadata", "node_properties", "host_keys", "resources"):
        value = attrs[key]
        if value is not None:
            attrs[key] = value.copy() if type(value) is not Resources else Resources(value)
    new.__dict__ = attrs
    return new


def file_checksums(path):
    """``(md5, sha256)`` hex digests of a file, read in chunks."""
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
            sha256.update(chunk)
    return md5.hexdigest(), sha256.hexdigest()
