"""The loaded configuration, as plain dataclasses.

``nodepool.config.loader.load_config`` validates a ``nodepool.yaml`` and builds these.  Keys that
every driver shares are typed attributes; keys of one driver stay in the ``options`` dict of the
provider, pool, pool label, provider diskimage or cloud image, under their YAML spelling
(``flavor-name``, ``instance-type``...), already validated by that driver's schema and with its
defaults filled in.  A driver reads its own options; nothing else does.
"""
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..model.quota import Limits


@dataclass
class Label:
    name: str
    min_ready: int = 0
    max_ready_age: int = 0          # seconds; 0 = never


@dataclass
class DiskImage:
    """A top-level ``diskimages`` entry after parent/abstract inheritance was resolved."""
    name: str
    elements: list = field(default_factory=list)
    release: Optional[str] = None
    env_vars: dict = field(default_factory=dict)
    formats: list = field(default_factory=list)       # explicit extra formats
    rebuild_age: int = 86400
    build_timeout: int = 28800
    pause: bool = False
    dib_cmd: str = "disk-image-create"
    username: str = "zuul"
    python_path: str = "auto"
    shell_type: Optional[str] = None
    parent: Optional[str] = None
    abstract: bool = False
    delete_after_upload: bool = False
    keep_formats: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    rollout: Any = None               # config.rollout.RolloutPolicy, or None (docs/rollout.md)


@dataclass
class PoolLabel:
    """A label as one pool makes it: which image, which size (driver options)."""
    name: str
    pool: str                         # pool name
    provider: str                     # provider name
    diskimage: Optional[str] = None
    cloud_image: Optional[str] = None
    options: dict = field(default_factory=dict)


@dataclass
class Pool:
    name: str
    provider: str
    max_servers: float = math.inf
    max_cores: float = math.inf
    max_ram: float = math.inf
    max_resources: dict = field(default_factory=dict)
    priority: int = 100
    node_attributes: Optional[dict] = None
    labels: dict = field(default_factory=dict)          # name -> PoolLabel
    azs: list = field(default_factory=list)
    host_key_checking: bool = True
    ignore_provider_quota: bool = False
    options: dict = field(default_factory=dict)

    @property
    def key(self):
        """``provider/pool``: unique within one configuration."""
        return f"{self.provider}/{self.name}"

    @property
    def limits(self):
        """The pool's static limits as a ``Limits`` (instances, cores, ram, extras)."""
        lim = Limits.of(instances=self.max_servers, cores=self.max_cores, ram=self.max_ram)
        lim.update(self.max_resources)
        return Limits({k: v for k, v in lim.items() if v != math.inf})


@dataclass
class ProviderDiskImage:
    """A provider's ``diskimages`` entry: a built image this provider receives uploads of."""
    name: str
    pause: bool = False
    connection_type: str = "ssh"
    connection_port: int = 22
    options: dict = field(default_factory=dict)
    rollout: Any = None               # overrides the diskimage's RolloutPolicy


@dataclass
class CloudImage:
    """A provider's ``cloud-images`` entry: an image that already exists in the cloud."""
    name: str
    username: str = "zuul"
    python_path: str = "auto"
    shell_type: Optional[str] = None
    connection_type: str = "ssh"
    connection_port: int = 22
    options: dict = field(default_factory=dict)


@dataclass
class Provider:
    name: str
    driver: str
    priority: int = 100
    rate: float = 1.0
    boot_timeout: float = 60
    launch_timeout: float = 3600
    launch_retries: int = 3
    max_concurrency: int = -1                     # <0 unlimited; 0 takes no requests
    image_name_format: str = "{image_name}-{timestamp}"
    post_upload_hook: Optional[str] = None
    image_upload_timeout: float = 3600
    pools: dict = field(default_factory=dict)       # name -> Pool
    diskimages: dict = field(default_factory=dict)  # name -> ProviderDiskImage
    cloud_images: dict = field(default_factory=dict)  # name -> CloudImage
    options: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)         # the validated YAML, to detect changes

    @property
    def manages_images(self):
        return bool(self.diskimages)

    def labels(self):
        """Every PoolLabel of every pool."""
        return [lbl for pool in self.pools.values() for lbl in pool.labels.values()]


@dataclass
class TenantLimit:
    tenant_name: str
    limits: Limits = field(default_factory=Limits)


@dataclass
class ZooKeeperServer:
    host: str
    port: int = 2281
    chroot: Optional[str] = None


@dataclass
class ZooKeeperTLS:
    ca: str
    cert: str
    key: str


@dataclass
class WebApp:
    port: int = 8005
    listen_address: str = "0.0.0.0"


@dataclass
class LauncherSettings:
    """``launcher:``: intervals of the launcher daemon's periodic passes, in seconds."""
    leak_interval: float = 60.0         # scan each provider's cloud for leaked resources


@dataclass
class BuilderSettings:
    """``builder:``: intervals of the builder daemon's loops, in seconds."""
    build_interval: float = 10.0        # look for images that need a build
    upload_interval: float = 10.0       # look for builds missing an upload
    cleanup_interval: float = 60.0      # janitor: retention, leaked cloud images, local files


@dataclass
class EmbeddedStore:
    path: str = "/var/lib/nodepool/nodepool.sqlite"
    session_timeout: float = 10.0


@dataclass
class Config:
    path: str = ""
    labels: dict = field(default_factory=dict)             # name -> Label
    diskimages: dict = field(default_factory=dict)         # name -> DiskImage (incl. abstract)
    providers: dict = field(default_factory=dict)          # name -> Provider
    tenant_limits: dict = field(default_factory=dict)      # tenant -> TenantLimit
    max_hold_age: float = 0
    webapp: WebApp = field(default_factory=WebApp)
    zookeeper_servers: list = field(default_factory=list)  # [ZooKeeperServer]
    zookeeper_tls: Optional[ZooKeeperTLS] = None
    zookeeper_timeout: float = 10.0
    embedded_store: EmbeddedStore = field(default_factory=EmbeddedStore)
    launcher: LauncherSettings = field(default_factory=LauncherSettings)
    builder: BuilderSettings = field(default_factory=BuilderSettings)
    images_dir: Optional[str] = None
    build_log_dir: str = "/var/log/nodepool/builds"
    build_log_retention: int = 7
    elements_dir: Optional[str] = None
    raw: Any = None
    # things worth telling the operator that do not make the file invalid (unused labels...)
    warnings: list = field(default_factory=list)
    # {file path: st_mtime_ns} of the files this config was read from (main and secure)
    source_mtimes: dict = field(default_factory=dict)

    def files_changed(self):
        """True when a file this config was read from was modified (or vanished) since."""
        for path, mtime in self.source_mtimes.items():
            try:
                if os.stat(path).st_mtime_ns != mtime:
                    return True
            except OSError:
                return True
        return False

    def pools(self):
        """Every pool of every provider."""
        return [pool for prov in self.providers.values() for pool in prov.pools.values()]

    def buildable_images(self):
        """Diskimages that are not abstract."""
        return {n: d for n, d in self.diskimages.items() if not d.abstract}
