"""The driver adapter contract.

A driver is one package under ``nodepool/drivers/<name>/``; its cloud SDK is imported only there,
so a missing SDK breaks only that driver.  The package exposes ``DRIVER``, an instance of a
``Driver`` subclass, which gives the config schema extensions and builds ``Adapter`` objects.

The framework (launcher, builder) owns the state store, locks, retries, timeouts, quota math,
host-key scans and leak detection.  An adapter only talks to the cloud.  Its methods are called
from one worker thread per provider; they may block for one API call but never wait for a server
to boot: launches and deletes are ``StateMachine`` objects advanced step by step.

Every API call an adapter makes goes through ``self.rate_limiter``
(``with self.rate_limiter.call(operation):``), so the provider's ``rate`` holds whatever the
adapter does and ``nodepool_api_calls_total`` counts every call.
"""
import abc
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional

from ..model.quota import Limits, Resources
from .ratelimit import RateLimiter

# Metadata keys put on every instance and resource we create (Nodepool 11's spelling).
META_NODE_ID = "nodepool_node_id"
META_POOL = "nodepool_pool_name"
META_PROVIDER = "nodepool_provider_name"
META_LAUNCHER = "nodepool_launcher"
META_BUILD_ID = "nodepool_build_id"
META_UPLOAD_ID = "nodepool_upload_id"

# An ``in-use`` node whose ``user_data`` is a mapping naming a configured provider under this
# key is that provider's to release (a metastatic backing node): cleanup leaves it alone even
# while nobody holds its lock, as across a launcher restart, until that provider lets it go.
KEPT_BY = "nodepool_kept_by"


def kept_by(node):
    """The provider keeping an in-use node (``KEPT_BY``), or None."""
    data = getattr(node, "user_data", None)
    return data.get(KEPT_BY) if isinstance(data, dict) else None


@dataclass
class Instance:
    """What the cloud tells us about one server."""
    external_id: Any
    metadata: dict = field(default_factory=dict)
    ready: bool = False
    deleted: bool = False
    failed: bool = False              # the cloud says the server is broken (ERROR state)
    interface_ip: Optional[str] = None
    public_ipv4: Optional[str] = None
    private_ipv4: Optional[str] = None
    public_ipv6: Optional[str] = None
    cloud: Optional[str] = None
    region: Optional[str] = None
    az: Optional[str] = None
    host_id: Optional[str] = None
    driver_data: Any = None
    slot: Optional[int] = None
    node_properties: list = field(default_factory=list)
    resources: Optional[Resources] = None    # what it costs (for unmanaged-quota accounting)
    # optional overrides of the image's access settings
    username: Optional[str] = None
    python_path: Optional[str] = None
    shell_type: Optional[str] = None
    connection_type: Optional[str] = None
    connection_port: Optional[int] = None
    host_keys: Optional[list] = None

    @property
    def node_id(self):
        return self.metadata.get(META_NODE_ID)

    @property
    def provider_name(self):
        return self.metadata.get(META_PROVIDER)


@dataclass
class RegisteredSlot:
    """One node slot of a pre-existing host (static driver) that should exist as a node now.

    ``answers`` is True when the host's last check succeeded, False when it failed (``error``
    says why) and None while it has not been checked yet (the framework then leaves the slot
    alone).  ``external_id`` is unique per slot (``host:port#slot``) and names the node record
    that stands for it.
    """
    external_id: str
    pool: str
    labels: list
    slot: int
    interface_ip: str
    username: str = "zuul"
    connection_type: str = "ssh"
    connection_port: int = 22
    host_keys: list = field(default_factory=list)
    python_path: Optional[str] = None
    shell_type: Optional[str] = None
    answers: Optional[bool] = None
    error: Optional[str] = None


@dataclass
class CloudResource:
    """A taggable cloud object (instance, volume, image, floating IP...) for leak cleanup.

    ``type`` is singular (``instance``, ``volume``); metrics use the plural."""
    type: str
    id: Any
    metadata: dict = field(default_factory=dict)
    name: Optional[str] = None


@dataclass
class LaunchSpec:
    """Everything an adapter needs to create one instance."""
    hostname: str                      # "np" + node id
    label: Any                         # config.model.PoolLabel
    pool: Any                          # config.model.Pool
    metadata: dict                     # tags to attach (META_* keys and more)
    image_external_id: Optional[str] = None   # boot this uploaded image; None -> label's cloud image
    az: Optional[str] = None
    request: Any = None                # model.NodeRequest the node is for, or None
    node_id: Optional[str] = None


@dataclass
class ImageUploadSpec:
    """Everything an adapter needs to upload one image build."""
    image_name: str                    # provider-side name (from image-name-format)
    filename: str                      # local file in ``image_format``
    image_format: str
    metadata: dict                     # META_BUILD_ID, META_UPLOAD_ID, META_PROVIDER + config meta
    provider_image: Any = None         # config.model.ProviderDiskImage
    md5: Optional[str] = None
    sha256: Optional[str] = None
    timeout: float = 3600


def request_namespace(request):
    """The request attributes that ``dynamic-tags``/``dynamic-instance-properties`` format
    strings may use (Nodepool's names), for a request or for none."""
    if request is None:
        return SimpleNamespace(id=None, labels=[], requestor=None, requestor_data=None,
                               relative_priority=0, event_id=None, created_time=None,
                               tenant_name=None)
    return SimpleNamespace(id=request.id, labels=list(request.node_types),
                           requestor=request.requestor, requestor_data=request.requestor_data,
                           relative_priority=request.relative_priority,
                           event_id=request.event_id, created_time=request.created_time,
                           tenant_name=request.tenant_name)


def apply_image_access(instance, provider, label):
    """Copy the connection settings (and, for cloud images, the login) of the label's image
    config onto a booted ``Instance``."""
    image = (provider.cloud_images.get(label.cloud_image) if label.cloud_image
             else provider.diskimages.get(label.diskimage))
    if image is None:
        return instance
    instance.connection_type = image.connection_type
    instance.connection_port = image.connection_port
    if label.cloud_image:
        instance.username = image.username
        instance.python_path = image.python_path
        instance.shell_type = image.shell_type
    return instance


class StateMachine(abc.ABC):
    """One create or delete, advanced by repeated ``advance()`` calls.

    ``advance()`` does a small non-blocking step (at most a few API calls) and returns None until
    done.  A create machine sets ``external_id`` as soon as the cloud has named the instance (so a
    partial launch can always be cleaned up) and returns the ready ``Instance`` when complete.  A
    delete machine returns True when the instance and its dependents are gone.  Errors are raised
    as ``nodepool.errors`` cloud errors: ``QuotaError`` (pause, retry later, not a failure),
    ``TransientCloudError`` and ``PermanentCloudError`` (count as a failed attempt).  A delete of
    an already missing instance completes normally.
    """

    START = "start"

    def __init__(self):
        self.state = self.START
        self.external_id = None
        self.complete = False
        self.start_time = time.monotonic()

    @abc.abstractmethod
    def advance(self):
        """Make progress; return the result when complete, else None."""


class Adapter(abc.ABC):
    """One provider's cloud, seen through the calls the framework needs."""

    #: True: at quota the pool pauses and keeps the request; False (static hosts): release it.
    pause_at_quota = True

    #: True (static hosts): used nodes go back to ready instead of being deleted.
    reuses_nodes = False

    #: False (static hosts): the provider never creates instances; requests wait for a free
    #: registered node instead (the planner defers rather than launching).
    launches = True

    def __init__(self, provider, rate_limiter=None):
        """``provider`` is a ``config.model.Provider`` of this driver."""
        self.provider = provider
        self.rate_limiter = rate_limiter or RateLimiter(provider.name, provider.rate)

    #: seconds ``_remember`` keeps a fetched value (flavors, images, AZs change rarely)
    memo_ttl = 300

    def _remember(self, key, fetch, ttl=None):
        """``fetch()``'s value for ``key``, fetched again once ``ttl`` seconds have passed."""
        memo = self.__dict__.setdefault("_memo", {})
        hit = memo.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[0] < (self.memo_ttl if ttl is None else ttl):
            return hit[1]
        value = fetch()
        memo[key] = (now, value)
        return value

    def forget(self, key):
        """Drop a remembered value (it turned out stale)."""
        self.__dict__.setdefault("_memo", {}).pop(key, None)

    #: the launcher's state store, given by ``attach_store`` before ``start()``; only drivers
    #: that are clients of the store themselves (metastatic) use it
    store = None

    def attach_store(self, store):
        """Called by the provider worker before ``start()`` with the launcher's store."""
        self.store = store

    def periodic(self):
        """Called from the provider worker's thread about every second once started, for
        housekeeping of drivers that need it (default: nothing).  Must not block for long."""

    def start(self):
        """Open long-lived clients.  May raise CloudError; the provider is then retried later."""

    def stop(self):
        """Close clients and executors."""

    @abc.abstractmethod
    def create_state_machine(self, spec):
        """A ``StateMachine`` that creates one instance as described by ``LaunchSpec``."""

    @abc.abstractmethod
    def delete_state_machine(self, external_id):
        """A ``StateMachine`` that deletes the instance and its dependents (IPs, volumes)."""

    @abc.abstractmethod
    def list_instances(self):
        """Every instance visible to the account, ours and others', as ``Instance`` objects.

        One call (or one paginated listing) per invocation: never a request per instance."""

    def list_resources(self):
        """Every taggable non-instance resource (volumes, images, IPs...) as ``CloudResource``."""
        return []

    def delete_resource(self, resource):
        """Delete one leaked resource; a missing resource is not an error."""

    def quota_limits(self):
        """The account's limits as ``Limits`` (default: unlimited)."""
        return Limits()

    def quota_for_label(self, label):
        """``Resources`` one node of ``PoolLabel`` costs.  Raise LabelConfigurationError when the
        label can never be served (e.g. unknown flavor)."""
        return Resources.of(instances=1)

    def availability_zones(self):
        """Candidate AZs for the pool (``[None]`` when the cloud has none)."""
        return [None]

    def label_ready(self, label):
        """Whether a cloud-image label's image exists (diskimage labels are checked by the
        framework against upload records)."""
        return True

    def upload_image(self, spec):
        """Upload an image (``ImageUploadSpec``) and return its external id.  Blocking: called
        from a builder upload thread, never from the launcher's loop."""
        raise NotImplementedError(f"driver {self.provider.driver} does not manage images")

    def delete_image(self, external_id):
        """Delete an uploaded image; a missing image is not an error."""
        raise NotImplementedError(f"driver {self.provider.driver} does not manage images")

    def list_images(self):
        """Images in the cloud carrying our metadata, as ``CloudResource(type="image")``."""
        return []

    def console_log(self, external_id):
        """The instance's console output, or None where the cloud has none."""
        return None

    def registered_nodes(self):
        """For providers of pre-existing hosts: every ``RegisteredSlot`` that should exist now.

        None (the default) for clouds, whose nodes are launched on request.  Called from the
        worker loop every tick or few: must not block (host checks run in the background).
        The worker reconciles node records against the answer (``ProviderWorker._reconcile``).
        """
        return None


class Driver(abc.ABC):
    """Entry point of a driver package: schema extensions and adapter construction."""

    name = None

    #: common keys this driver does not take, per level (``provider``, ``pool``, ``label``):
    #: the schema refuses them naming the driver, as Nodepool's schema of that driver does
    unused_common_keys = {}

    #: True (OpenStack): a pool label may name a diskimage listed only in the top-level
    #: ``diskimages`` and not in the provider's; the config loads with a warning and the label
    #: has no image on that provider.  False: that is a config error.
    label_image_may_be_missing = False

    #: defaults for provider keys shared by all drivers but with driver-specific defaults
    provider_defaults = {"rate": 1.0, "boot-timeout": 60, "launch-timeout": 3600,
                         "launch-retries": 3}

    def provider_schema(self):
        """voluptuous dict of this driver's extra provider keys (beyond the common ones)."""
        return {}

    def pool_schema(self):
        """voluptuous dict of this driver's extra pool keys."""
        return {}

    def label_schema(self):
        """voluptuous dict of this driver's extra pool-label keys."""
        return {}

    def diskimage_schema(self):
        """voluptuous dict of this driver's extra provider-diskimage keys."""
        return {}

    def cloud_image_schema(self):
        """voluptuous dict of this driver's extra cloud-image keys."""
        return {}

    def check_provider(self, provider, config):
        """Cross-checks that need the whole config; return a list of (key_path, message).
        Only the file itself: credentials and cloud entries are ``check_cloud``'s business, so
        that one provider's missing cloud never invalidates the whole configuration."""
        return []

    def check_cloud(self, provider):
        """Load this provider's cloud configuration (credentials, clouds.yaml entry, profile,
        region) without calling the cloud: None when it loads, else one line saying why.
        ``nodepool config-validate --check-clouds`` asks this; the adapter's ``start()`` raises
        the same fact as the provider's start error."""
        return None

    def finalize(self, provider, config):
        """Fill defaults that depend on the whole config (called once the config is built)."""

    @abc.abstractmethod
    def adapter(self, provider, rate_limiter=None):
        """Build the ``Adapter`` for a ``config.model.Provider`` of this driver."""
