"""OpenStack adapter: launches and deletes as state machines over openstacksdk.

One detailed server list (and one floating-IP list when needed) per provider per second serves
every state machine and ``list_instances``: a machine never GETs its own server.  Every API call
goes through the provider's rate limiter; OpenStack's ``rate`` is *seconds between calls*.
SDK and HTTP errors are turned into ``nodepool.errors`` classes naming the provider and the thing.
"""
import base64
import logging
import re
import time

import keystoneauth1.exceptions as ks_exc
import openstack
from openstack import exceptions as os_exc

from ...errors import (CloudError, InstanceNotFound, LabelConfigurationError,
                       PermanentCloudError, QuotaError, TransientCloudError)
from ...model.quota import Limits, Resources
from ..base import (META_BUILD_ID, META_NODE_ID, META_PROVIDER, META_UPLOAD_ID, Adapter,
                    CloudResource,
                    Instance, StateMachine, apply_image_access, request_namespace)
from ..ratelimit import RateLimiter, count_api_call
from . import DEFAULT_IMAGE_FORMAT
from .flavors import choose_flavor
from .addresses import classify_addresses

LIST_TTL = 1.0            # seconds a server/floating-IP listing is shared before it is refreshed
API_TIMEOUT = 60          # seconds one HTTP call may take
UPLOAD_POLL = 2.0         # seconds between status checks of an upload
UNANSWERED_KEEP = 3600    # seconds a create without an answer is remembered for its node

log = logging.getLogger("nodepool.drivers.openstack")


def translate_error(exc, what):
    """Map an SDK/keystoneauth exception to our error classes, with ``what`` as the subject."""
    if isinstance(exc, CloudError):
        return exc
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    status = getattr(exc, "status_code", None) or getattr(exc, "http_status", None)
    lowered = str(exc).lower()
    if status == 403 and "quota" in lowered or "quota exceeded" in lowered:
        return QuotaError(f"{what}: {text}")
    if "no valid host" in lowered:
        return QuotaError(f"{what}: {text}")
    if isinstance(exc, (ks_exc.Unauthorized, os_exc.ForbiddenException)) or status in (401, 403):
        return PermanentCloudError(f"{what}: not authorised (check the credentials in "
                                   f"clouds.yaml): {text}")
    if isinstance(exc, (os_exc.NotFoundException, ks_exc.NotFound)) or status == 404:
        return InstanceNotFound(f"{what}: not found: {text}")
    if isinstance(exc, (ks_exc.ConnectFailure, ks_exc.ConnectionError, ks_exc.ConnectTimeout,
                        ks_exc.RequestTimeout, ks_exc.DiscoveryFailure)):
        return TransientCloudError(f"{what}: API unreachable: {text}")
    if status is not None and (status >= 500 or status == 429 or status == 409):
        return TransientCloudError(f"{what}: API error {status}: {text}")
    if isinstance(exc, (ks_exc.EndpointNotFound, os_exc.ServiceDisabledException)):
        return PermanentCloudError(f"{what}: service not in the catalog: {text}")
    if isinstance(exc, os_exc.ConfigException):
        return PermanentCloudError(f"{what}: {text}")
    if status is not None and 400 <= status < 500:
        return PermanentCloudError(f"{what}: API refused ({status}): {text}")
    return TransientCloudError(f"{what}: {type(exc).__name__}: {text}")


class Listing:
    """A list call shared by every reader for ``ttl`` seconds.

    ``get(after)`` returns a listing whose request started at or after monotonic time ``after``,
    fetching one if the cached one is older than that or than the TTL."""

    def __init__(self, fetch, ttl=LIST_TTL):
        self._fetch = fetch
        self.ttl = ttl
        self.items = None
        self.started = -1.0
        self._invalid = False

    def get(self, after=None):
        now = time.monotonic()
        stale = self.items is None or self._invalid or now - self.started >= self.ttl
        if after is not None and self.started < after:
            stale = True
        if stale:
            started = time.monotonic()
            self.items = self._fetch()
            self.started = started
            self._invalid = False
        return self.items

    def invalidate(self):
        self._invalid = True


class SdkMethodName:
    """Stands in for the SDK connection during one ``call`` and remembers the first method the
    call reaches (``compute.create_server``, ``get_external_ipv4_floating_networks``): the
    ``operation`` label of ``nodepool_api_calls_total``.  Everything else passes through."""

    def __init__(self, target, prefix=None, owner=None):
        self._target = target
        self._prefix = prefix
        self._owner = owner or self
        self.operation = None

    def __getattr__(self, name):
        value = getattr(self._target, name)
        path = f"{self._prefix}.{name}" if self._prefix else name
        if self._prefix is None and hasattr(value, "get_endpoint"):   # a service proxy
            return SdkMethodName(value, path, self._owner)
        if callable(value) and self._owner.operation is None:
            self._owner.operation = path
        return value


class OpenStackAdapter(Adapter):
    """One OpenStack provider (a clouds.yaml cloud + region)."""

    def __init__(self, provider, rate_limiter=None):
        if rate_limiter is None:
            seconds = provider.rate
            rate_limiter = RateLimiter(provider.name, 1.0 / seconds if seconds and seconds > 0
                                       else 0)
        super().__init__(provider, rate_limiter)
        self.cloud_name = provider.options["cloud"]
        self.region = provider.options.get("region-name")
        self._conn = None
        self.servers = Listing(self._list_servers)
        self.floating_ips = Listing(self._list_floating_ips)
        self._down_ports = {}         # port id -> monotonic time first seen DOWN
        self._unanswered = {}         # node id -> monotonic time its create got no answer
        self.log = logging.getLogger(f"nodepool.drivers.openstack.{provider.name}")

    # -- connection and calls ---------------------------------------------------------------------

    @property
    def what(self):
        return f"provider {self.provider.name} (cloud {self.cloud_name})"

    def start(self):
        """Read clouds.yaml and build the connection (no API call: the cloud may be down now)."""
        self.connection()

    def connection(self):
        if self._conn is None:
            try:
                self._conn = openstack.connect(cloud=self.cloud_name, region_name=self.region,
                                               api_timeout=API_TIMEOUT)
            except Exception as exc:
                raise PermanentCloudError(f"{self.what}: cannot load cloud {self.cloud_name!r} "
                                          f"from clouds.yaml: {exc}") from exc
        return self._conn

    def call(self, what, func, *args, **kwargs):
        """One rate-limited API call, ``func(connection)``; errors come back as our classes
        naming ``what``.  The call is counted under the SDK method ``func`` reaches (see
        ``SdkMethodName``), so call sites need not name it twice."""
        named = SdkMethodName(self.connection())
        with self.rate_limiter:
            try:
                return func(named, *args, **kwargs)
            except Exception as exc:
                raise translate_error(exc, f"{self.what}: {what}") from exc
            finally:
                count_api_call(self.provider.name, named.operation or "unknown")

    def stop(self):
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None


    # -- cached reads -----------------------------------------------------------------------------

    def _list_servers(self):
        return self.call("list servers",
                         lambda c: {s.id: s for s in c.compute.servers(details=True)})

    def _list_floating_ips(self):
        return self.call("list floating IPs", lambda c: list(c.network.ips()))

    def flavors(self):
        return self._remember("flavors", lambda: self.call(
            "list flavors", lambda c: list(c.compute.flavors(details=True))))

    def networks(self):
        return self._remember("networks", lambda: self.call(
            "list networks", lambda c: list(c.network.networks())))

    def external_network_names(self):
        return {n.name for n in self.networks() if n.is_router_external} | \
               {n.id for n in self.networks() if n.is_router_external}

    def network_id(self, name):
        for net in self.networks():
            if name in (net.name, net.id):
                return net.id
        self.forget("networks")
        raise PermanentCloudError(f"{self.what}: network {name!r} not found")

    def floating_network_id(self):
        """The network floating IPs come from: clouds.yaml's choice, else the first external one."""
        def find():
            nets = self.call("find external networks",
                             lambda c: c.get_external_ipv4_floating_networks())
            return nets[0]["id"] if nets else None
        net = self._remember("floating-network", find)
        if not net:
            raise PermanentCloudError(f"{self.what}: no external network for floating IPs")
        return net

    def flavor_for(self, label):
        """The flavor of a pool label, by Nodepool's rule; LabelConfigurationError if none."""
        opts = label.options
        flavor = choose_flavor(self.flavors(), opts.get("min-ram"), opts.get("flavor-name"))
        if flavor is None:
            self.forget("flavors")
            wanted = (f"min-ram {opts.get('min-ram')}" if opts.get("min-ram") is not None
                      else "")
            if opts.get("flavor-name"):
                wanted = (wanted + " and " if wanted else "") + \
                    f"flavor-name {opts.get('flavor-name')!r}"
            raise LabelConfigurationError(f"{self.what}: label {label.name}: no flavor "
                                          f"matches {wanted}")
        return flavor

    def cloud_image_id(self, cloud_image):
        """Glance id of a ``cloud-images`` entry (by image-id, image-name, or its name)."""
        if cloud_image.options.get("image-id"):
            return cloud_image.options["image-id"]
        name = cloud_image.options.get("image-name") or cloud_image.name

        def find():
            image = self.call(f"find image {name}",
                              lambda c: c.image.find_image(name, ignore_missing=True))
            return image.id if image else None
        image_id = self._remember(("image", name), find)
        if image_id is None:
            self.forget(("image", name))
            raise PermanentCloudError(f"{self.what}: image {name!r} not found")
        return image_id

    # -- adapter contract -------------------------------------------------------------------------

    def create_state_machine(self, spec):
        return CreateServer(self, spec)

    def create_unanswered(self, node_id):
        """Remember that a create for ``node_id`` failed without an answer (timeout, 5xx,
        lost connection): nova may have made the server all the same."""
        now = time.monotonic()
        for old in [n for n, t in self._unanswered.items() if now - t > UNANSWERED_KEEP]:
            del self._unanswered[old]
        self._unanswered[node_id] = now

    def server_left_by_unanswered_create(self, spec):
        """The server an unanswered earlier create of this node made (same name and node-id
        metadata, not deleted), or None; asks the cloud only after such a create, so a normal
        launch costs no extra call."""
        if self._unanswered.pop(spec.node_id, None) is None:
            return None
        pattern = f"^{re.escape(spec.hostname)}$"
        servers = self.call(f"node {spec.node_id}: look for server {spec.hostname} of an "
                            f"unanswered create",
                            lambda c: list(c.compute.servers(details=True, name=pattern)))
        for server in servers:
            status = (server.status or "").upper()
            if ((server.metadata or {}).get(META_NODE_ID) == spec.node_id
                    and status not in ("DELETED", "SOFT_DELETED")):
                return server
        return None

    def delete_state_machine(self, external_id):
        return DeleteServer(self, external_id)

    def list_instances(self):
        servers = self.servers.get()
        return [self.instance_of(s) for s in servers.values()]

    def instance_of(self, server):
        """Our ``Instance`` view of an SDK server (addresses picked here, not by the SDK)."""
        addrs = classify_addresses(server.addresses or {}, self.external_network_names()
                                   if server.addresses else set())
        private_pref = bool(self.connection().config.config.get("private"))
        flavor = server.flavor or {}
        resources = Resources.of(instances=1, cores=flavor.get("vcpus") or 0,
                                 ram=flavor.get("ram") or 0)
        status = (server.status or "").upper()
        interface = (addrs["private_ipv4"] if private_pref and addrs["private_ipv4"] else
                     addrs["public_ipv4"] or addrs["public_ipv6"] or addrs["private_ipv4"])
        return Instance(
            external_id=server.id, metadata=dict(server.metadata or {}),
            ready=status == "ACTIVE", deleted=status in ("DELETED", "SOFT_DELETED"),
            failed=status == "ERROR", interface_ip=interface,
            public_ipv4=addrs["public_ipv4"], private_ipv4=addrs["private_ipv4"],
            public_ipv6=addrs["public_ipv6"], cloud=self.cloud_name,
            region=self.region or self.connection().config.region_name,
            az=server.availability_zone, host_id=server.host_id, resources=resources)

    def list_resources(self):
        """DOWN compute ports older than port-cleanup-interval; unattached floating IPs when
        clean-floating-ips.  Tagged with our provider so the leak scan may delete them."""
        out = []
        meta = {META_PROVIDER: self.provider.name}
        interval = self.provider.options.get("port-cleanup-interval", 600)
        if interval:
            ports = self.call("list DOWN ports", lambda c: list(c.network.ports(status="DOWN")))
            now = time.monotonic()
            seen = {}
            for port in ports:
                owner = port.device_owner or ""
                if owner and not owner.startswith("compute:"):
                    continue
                first = self._down_ports.get(port.id, now)
                seen[port.id] = first
                if now - first >= interval:
                    out.append(CloudResource("port", port.id, dict(meta), port.name))
            self._down_ports = seen
        if self.provider.options.get("clean-floating-ips"):
            for fip in self.floating_ips.get(after=time.monotonic()):
                if not fip.port_id:
                    out.append(CloudResource("floatingip", fip.id, dict(meta),
                                             fip.floating_ip_address))
        return out

    def delete_resource(self, resource):
        try:
            if resource.type == "port":
                self.call(f"delete port {resource.id}",
                          lambda c: c.network.delete_port(resource.id, ignore_missing=True))
                self._down_ports.pop(resource.id, None)
            elif resource.type == "floatingip":
                self.call(f"delete floating IP {resource.name}",
                          lambda c: c.network.delete_ip(resource.id, ignore_missing=True))
                self.floating_ips.invalidate()
            elif resource.type == "image":
                self.delete_image(resource.id)
        except InstanceNotFound:
            pass
        self.log.info("%s: deleted leaked %s %s (%s)", self.what, resource.type, resource.id,
                      resource.name)

    def quota_limits(self):
        limits = self.call("read compute limits", lambda c: c.compute.get_limits().absolute)
        out = Limits()
        for ours, theirs in (("instances", "max_total_instances"),
                             ("cores", "max_total_cores"), ("ram", "max_total_ram_size")):
            value = getattr(limits, theirs, None)
            if value is not None and value >= 0:
                out[ours] = value
        out.update(self._volume_limits())
        return out

    def _volume_limits(self):
        """Volume limits when the cloud has a block-storage service (absent: no limit)."""
        try:
            absolute = self.call("read volume limits",
                                 lambda c: c.block_storage.get_limits().absolute)
        except PermanentCloudError:
            return {}          # no cinder in the catalog: volumes are not limited here
        out = {}
        for ours, theirs in (("volumes", "max_total_volumes"),
                             ("volume-gb", "max_total_volume_gigabytes")):
            value = getattr(absolute, theirs, None)
            if value is not None and value >= 0:
                out[ours] = value
        return out

    def quota_for_label(self, label):
        flavor = self.flavor_for(label)
        need = Resources.of(instances=1, cores=flavor.vcpus or 0, ram=flavor.ram or 0)
        if label.options.get("boot-from-volume"):
            need["volumes"] = 1
            need["volume-gb"] = label.options.get("volume-size", 50)
        return need

    def availability_zones(self):
        zones = self._remember("azs", lambda: self.call(
            "list availability zones",
            lambda c: [z.name for z in c.compute.availability_zones()
                       if (z.state or {}).get("available", True)]))
        return zones or [None]

    def label_ready(self, label):
        image = self.provider.cloud_images.get(label.cloud_image) if label.cloud_image else None
        if image is None:
            return True
        try:
            self.cloud_image_id(image)
        except PermanentCloudError:
            return False
        return True

    def image_format(self):
        """The format Glance wants from us: clouds.yaml ``image_format`` (default qcow2)."""
        return self.connection().config.config.get("image_format") or DEFAULT_IMAGE_FORMAT

    def upload_image(self, spec):
        """Upload to Glance with our properties; returns when the image is active."""
        props = {str(k): str(v) for k, v in (spec.metadata or {}).items()}
        fmt = spec.image_format or self.image_format()
        what = f"upload image {spec.image_name}"
        image = self.call(what, lambda c: c.image.create_image(
            name=spec.image_name, filename=spec.filename, disk_format=fmt,
            container_format="bare", md5=spec.md5, sha256=spec.sha256, wait=True,
            timeout=spec.timeout, allow_duplicates=True, meta=props, **props))
        if image is None:
            raise TransientCloudError(f"{self.what}: {what}: no image returned")
        deadline = time.monotonic() + spec.timeout
        while (image.status or "").lower() != "active":
            if (image.status or "").lower() in ("killed", "deleted", "deactivated"):
                raise TransientCloudError(f"{self.what}: {what}: image {image.id} is "
                                          f"{image.status}")
            if time.monotonic() > deadline:
                self.delete_image(image.id)
                raise TransientCloudError(f"{self.what}: {what}: image {image.id} not active "
                                          f"within image-upload-timeout {spec.timeout}s")
            time.sleep(UPLOAD_POLL)
            image = self.call(f"{what}: status", lambda c: c.image.get_image(image.id))
        self.log.info("%s: uploaded image %s as %s", self.what, spec.image_name, image.id)
        return image.id

    def delete_image(self, external_id):
        try:
            self.call(f"delete image {external_id}",
                      lambda c: c.image.delete_image(external_id, ignore_missing=True))
        except InstanceNotFound:
            pass

    def list_images(self):
        images = self.call("list images", lambda c: list(c.image.images()))
        out = []
        for image in images:
            props = dict(image.properties or {})
            if props.get(META_PROVIDER) != self.provider.name:
                continue
            meta = {k: props[k] for k in (META_PROVIDER, META_BUILD_ID, META_UPLOAD_ID)
                    if k in props}
            out.append(CloudResource("image", image.id, meta, image.name))
        return out

    def console_log(self, external_id):
        try:
            out = self.call(f"console log of server {external_id}",
                            lambda c: c.compute.get_server_console_output(external_id))
        except CloudError as exc:
            self.log.warning("%s: no console log for %s: %s", self.what, external_id, exc)
            return None
        return (out or {}).get("output")




def server_metadata(spec, provider_name, image_name):
    """Nova metadata for a launch: ours, ``groups``, instance-properties, dynamic ones."""
    opts = spec.label.options
    meta = {k: str(v) for k, v in (opts.get("instance-properties") or {}).items()}
    ns = request_namespace(spec.request)
    for key, template in (opts.get("dynamic-instance-properties") or {}).items():
        try:
            meta[key] = str(template).format(request=ns)
        except Exception as exc:   # a bad template must not fail the launch
            log.warning("label %s: dynamic-instance-property %s: cannot format %r: %s",
                        spec.label.name, key, template, exc)
    meta["groups"] = ",".join(x for x in (provider_name, image_name, spec.label.name) if x)
    meta.update({k: str(v) for k, v in spec.metadata.items()})
    return {k: v[:255] for k, v in meta.items()}


class CreateServer(StateMachine):
    """create server → ACTIVE in the shared listing → (floating IP → ACTIVE) → Instance."""

    SERVER_CREATING = "server creating"
    FIP_ATTACHING = "floating ip attaching"

    def __init__(self, adapter, spec):
        super().__init__()
        self.adapter = adapter
        self.spec = spec
        self.created_at = None
        self.fip = None
        self.log = logging.LoggerAdapter(log, {"node": spec.node_id})

    def _what(self):
        return f"{self.adapter.what}: node {self.spec.node_id}"

    def advance(self):
        if self.state == self.START:
            self._create()
            return None
        if self.state == self.SERVER_CREATING:
            server = self._listed_server()
            if server is None:
                return None
            status = (server.status or "").upper()
            if status == "ERROR":
                self._server_failed(server)
            if status != "ACTIVE":
                return None
            if self._needs_floating_ip(server):
                self._attach_floating_ip(server)
                self.state = self.FIP_ATTACHING
                return None
            return self._done(server)
        if self.state == self.FIP_ATTACHING:
            fips = {f.id: f for f in self.adapter.floating_ips.get()}
            fip = fips.get(self.fip.id)
            if fip is None or (fip.status or "").upper() != "ACTIVE":
                return None
            server = self._listed_server()
            if server is None:
                return None
            return self._done(server, fip.floating_ip_address)
        return None

    def _create(self):
        adapter, spec = self.adapter, self.spec
        label, pool = spec.label, spec.pool
        opts = label.options
        flavor = adapter.flavor_for(label)
        config_drive = None
        if spec.image_external_id:
            image_id = spec.image_external_id
            image_name = label.diskimage
            dimage = adapter.provider.diskimages.get(label.diskimage)
            if dimage is not None:
                config_drive = dimage.options.get("config-drive")
        else:
            cloud_image = adapter.provider.cloud_images.get(label.cloud_image)
            if cloud_image is None:
                raise PermanentCloudError(f"{self._what()}: label {label.name}: cloud image "
                                          f"{label.cloud_image!r} is not configured")
            image_id = adapter.cloud_image_id(cloud_image)
            image_name = cloud_image.name
            config_drive = cloud_image.options.get("config-drive")
        nets = opts.get("networks") or pool.options.get("networks") or []
        kwargs = dict(name=spec.hostname, flavor_id=flavor.id,
                      metadata=server_metadata(spec, adapter.provider.name, image_name),
                      networks=[{"uuid": adapter.network_id(n)} for n in nets] or "auto")
        if opts.get("boot-from-volume"):
            kwargs["block_device_mapping"] = [{
                "boot_index": 0, "uuid": image_id, "source_type": "image",
                "destination_type": "volume", "volume_size": opts.get("volume-size", 50),
                "delete_on_termination": True}]
        else:
            kwargs["image_id"] = image_id
        if opts.get("key-name"):
            kwargs["key_name"] = opts["key-name"]
        if opts.get("userdata"):
            kwargs["user_data"] = base64.b64encode(opts["userdata"].encode()).decode()
        if config_drive is not None:
            kwargs["config_drive"] = config_drive
        if spec.az:
            kwargs["availability_zone"] = spec.az
        groups = pool.options.get("security-groups") or []
        if groups:
            kwargs["security_groups"] = [{"name": g} for g in groups]
        self.created_at = time.monotonic()
        server = adapter.server_left_by_unanswered_create(spec)
        if server is not None:
            self.external_id = server.id
            self.state = self.SERVER_CREATING
            self.log.info("%s: server %s made by an earlier create whose answer was lost: "
                          "using it", self._what(), server.id)
            return
        try:
            server = adapter.call(f"node {spec.node_id}: create server {spec.hostname}",
                                  lambda c: c.compute.create_server(**kwargs))
        except TransientCloudError:
            adapter.create_unanswered(spec.node_id)
            raise
        except PermanentCloudError as exc:
            if "image" in str(exc).lower() or "flavor" in str(exc).lower():
                adapter.forget("flavors")
                adapter.forget(("image", image_name))
            raise
        self.external_id = server.id
        self.state = self.SERVER_CREATING
        self.log.info("%s: server %s created (%s, flavor %s)", self._what(), server.id,
                      spec.hostname, flavor.name)

    def _listed_server(self):
        """Our server from a listing made after it was created; error if it vanished."""
        servers = self.adapter.servers.get(after=self.created_at)
        server = servers.get(self.external_id)
        if server is None:
            raise TransientCloudError(f"{self._what()}: server {self.external_id} disappeared "
                                      f"while booting")
        return server

    def _server_failed(self, server):
        fault = (server.fault or {}) if hasattr(server, "fault") else {}
        message = fault.get("message") or "no fault given"
        if self.spec.label.options.get("console-log"):
            output = self.adapter.console_log(server.id)
            if output:
                self.log.info("%s: console log of %s:\n%s", self._what(), server.id, output)
        if "no valid host" in message.lower():
            raise QuotaError(f"{self._what()}: server {server.id}: {message}")
        raise PermanentCloudError(f"{self._what()}: server {server.id} went to ERROR: "
                                  f"{message}")

    def _needs_floating_ip(self, server):
        if not self.spec.pool.options.get("auto-floating-ip", True):
            return False
        inst = self.adapter.instance_of(server)
        if inst.public_ipv4 or inst.public_ipv6:
            return False
        try:
            self.adapter.floating_network_id()
        except PermanentCloudError:
            return False        # no external network: private addresses only
        return bool(inst.private_ipv4)

    def _attach_floating_ip(self, server):
        adapter = self.adapter
        ports = adapter.call(f"node {self.spec.node_id}: ports of server {server.id}",
                             lambda c: list(c.network.ports(device_id=server.id)))
        if not ports:
            raise TransientCloudError(f"{self._what()}: server {server.id} has no port for a "
                                      f"floating IP")
        network_id = adapter.floating_network_id()
        self.fip = adapter.call(
            f"node {self.spec.node_id}: create floating IP",
            lambda c: c.network.create_ip(floating_network_id=network_id, port_id=ports[0].id,
                                          description=f"nodepool node {self.spec.node_id}"))
        adapter.floating_ips.invalidate()
        self.log.info("%s: floating IP %s attached to %s", self._what(),
                      self.fip.floating_ip_address, server.id)

    def _done(self, server, floating_ip=None):
        inst = self.adapter.instance_of(server)
        if floating_ip and not inst.public_ipv4:
            inst.public_ipv4 = floating_ip
            inst.interface_ip = floating_ip if not (
                self.adapter.connection().config.config.get("private")) else inst.interface_ip
        label = self.spec.label
        apply_image_access(inst, self.adapter.provider, label)
        self.complete = True
        return inst


class DeleteServer(StateMachine):
    """delete our floating IPs → delete server → gone from a later listing."""

    DELETING = "server deleting"

    def __init__(self, adapter, external_id):
        super().__init__()
        self.adapter = adapter
        self.external_id = external_id
        self.deleted_at = None

    def advance(self):
        adapter = self.adapter
        if self.state == self.START:
            servers = adapter.servers.get()
            server = servers.get(self.external_id)
            if server is None:
                # the cached listing may predate the server: confirm with a fresh one
                server = adapter.servers.get(after=time.monotonic()).get(self.external_id)
            if server is None:
                self.complete = True
                return True
            self._delete_floating_ips(server)
            try:
                adapter.call(f"delete server {self.external_id}",
                             lambda c: c.compute.delete_server(self.external_id,
                                                               ignore_missing=True))
            except InstanceNotFound:
                pass
            self.deleted_at = time.monotonic()
            self.state = self.DELETING
            return None
        if self.state == self.DELETING:
            server = adapter.servers.get(after=self.deleted_at).get(self.external_id)
            if server is None or (server.status or "").upper() in ("DELETED", "SOFT_DELETED"):
                self.complete = True
                return True
            if (server.status or "").upper() == "ERROR" and \
                    time.monotonic() - self.deleted_at > 30:
                # a server stuck in ERROR may ignore a delete: ask again
                adapter.call(f"delete server {self.external_id} again",
                             lambda c: c.compute.delete_server(self.external_id,
                                                               ignore_missing=True))
                self.deleted_at = time.monotonic()
            return None
        return None

    def _delete_floating_ips(self, server):
        """Floating IPs on the server's addresses (one shared listing, a delete per IP)."""
        floating = {a.get("addr") for addrs in (server.addresses or {}).values()
                    for a in addrs if a.get("OS-EXT-IPS:type") == "floating"}
        ports = None
        fips = self.adapter.floating_ips.get()
        mine = [f for f in fips if f.floating_ip_address in floating]
        if not mine and any(f.port_id for f in fips):
            # addresses may lag behind neutron: match by the server's ports as well
            ports = {p.id for p in self.adapter.call(
                f"ports of server {self.external_id}",
                lambda c: list(c.network.ports(device_id=self.external_id)))}
            mine = [f for f in fips if f.port_id in ports]
        for fip in mine:
            try:
                self.adapter.call(f"delete floating IP {fip.floating_ip_address} of server "
                                  f"{self.external_id}",
                                  lambda c, fid=fip.id: c.network.delete_ip(fid,
                                                                           ignore_missing=True))
            except InstanceNotFound:
                pass
        if mine:
            self.adapter.floating_ips.invalidate()
