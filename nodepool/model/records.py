"""The shared records: nodes, node requests, image builds, image uploads, components.

Records are plain data.  ``to_dict`` produces exactly the JSON object Nodepool 11 stores in
ZooKeeper (every known key, ``None`` when unset); ``from_dict`` accepts what Nodepool, Zuul or an
older version of us wrote and keeps keys we do not know in ``extra`` so that rewriting a record
never drops another program's data.

Identity and bookkeeping that is not part of the stored JSON (the id, which is the znode name, and
the store's version counter used for compare-and-set) live in attributes that ``to_dict`` skips.
"""
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .states import BuildState, NodeState, RequestState, UploadState, check_transition


def _now():
    return time.time()


class _Record:
    """Serialisation shared by all records.

    Subclasses are dataclasses; fields named in ``_LOCAL`` are bookkeeping, not stored JSON.
    """

    _LOCAL = ("id", "version", "extra")
    _STATE_TYPE = None

    def to_dict(self):
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name in self._LOCAL:
                continue
            value = getattr(self, f.name)
            if isinstance(value, (NodeState, RequestState, BuildState, UploadState)):
                value = value.value
            out[self._json_key(f.name)] = value
        return out

    @staticmethod
    def _json_key(name):
        return name

    @classmethod
    def _stored_fields(cls):
        """``(attribute, JSON key)`` of each stored field, worked out once per class: reading
        ten thousand records must not ask ``dataclasses`` ten thousand times."""
        fields = cls.__dict__.get("_STORED_FIELDS")
        if fields is None:
            fields = tuple((f.name, cls._json_key(f.name)) for f in dataclasses.fields(cls)
                           if f.name not in cls._LOCAL)
            cls._STORED_FIELDS = fields
        return fields

    @classmethod
    def _reading_table(cls):
        """``(JSON key -> attribute, defaults, factories)`` of the stored fields, worked out
        once per class: ``from_dict`` fills a record from it without the generated
        ``__init__``.  ``defaults`` holds the plain defaults of every field (``id``,
        ``version`` and ``extra`` are set by ``from_dict``), ``factories`` the
        ``(attribute, factory)`` of the others (lists, dicts)."""
        table = cls.__dict__.get("_READING_TABLE")
        if table is None:
            defaults, factories = {}, []
            for f in dataclasses.fields(cls):
                if f.name in ("id", "version", "extra"):
                    continue
                if f.default_factory is not dataclasses.MISSING:
                    factories.append((f.name, f.default_factory))
                else:
                    defaults[f.name] = None if f.default is dataclasses.MISSING else f.default
            table = ({key: name for name, key in cls._stored_fields()}, defaults,
                     tuple(factories))
            cls._READING_TABLE = table
        return table

    @classmethod
    def from_dict(cls, data, id=None, version=None):
        """The record ``data`` (a stored JSON object) describes; keys we do not know go to
        ``extra``.  Does what ``cls(**fields)`` does (defaults, then ``_normalise``) without the
        keyword call, which was most of reading ten thousand nodes."""
        names, defaults, factories = cls._reading_table()
        data = data or {}
        attrs = defaults.copy()
        if cls._json_key is _Record._json_key:      # JSON keys are the attribute names
            unknown = data.keys() - names.keys()
            attrs.update(data)
            extra = {key: attrs.pop(key) for key in data if key in unknown} if unknown else {}
        else:
            extra = {}
            for key, value in data.items():
                name = names.get(key)
                if name is None:
                    extra[key] = value
                else:
                    attrs[name] = value
        for name, factory in factories:
            if name not in attrs:
                attrs[name] = factory()
        attrs["id"] = id
        attrs["version"] = version
        attrs["extra"] = extra
        rec = object.__new__(cls)
        rec.__dict__.update(attrs)
        rec._normalise()
        return rec

    def __post_init__(self):
        self._normalise()

    def _normalise(self):
        if self._STATE_TYPE is not None and self.state is not None:
            try:
                self.state = self._STATE_TYPE(self.state)
            except ValueError:
                pass  # a state from a newer program: keep the string, never judge it

    def set_state(self, state, when=None):
        """Move to ``state`` (checked against the transition table) and stamp ``state_time``."""
        state = self._STATE_TYPE(state)
        check_transition(self.state, state)
        self.state = state
        self.state_time = when if when is not None else _now()

    def copy(self):
        """A copy whose list and dict fields can be changed without touching this record.
        (Attribute by attribute: ``dataclasses.replace`` runs ``__init__`` and ``_normalise``
        again, many times the cost, for a record that is already normalised.)"""
        new = object.__new__(self.__class__)
        new.__dict__.update({name: (list(value) if isinstance(value, list) else
                                    dict(value) if isinstance(value, dict) else value)
                             for name, value in self.__dict__.items()})
        return new


@dataclass(eq=False)
class Node(_Record):
    """One machine (or static host slot) that can be handed to a requestor."""

    _STATE_TYPE = NodeState

    state: Any = NodeState.INIT
    state_time: Optional[float] = None
    cloud: Optional[str] = None
    provider: Optional[str] = None
    pool: Optional[str] = None
    type: list = field(default_factory=list)
    allocated_to: Optional[str] = None
    az: Optional[str] = None
    region: Optional[str] = None
    public_ipv4: Optional[str] = None
    private_ipv4: Optional[str] = None
    public_ipv6: Optional[str] = None
    host_id: Optional[str] = None
    interface_ip: Optional[str] = None
    connection_type: Optional[str] = None
    connection_port: Any = 22
    ssh_port: Optional[int] = 22
    image_id: Optional[str] = None
    launcher: Optional[str] = None
    created_time: Optional[float] = None
    external_id: Any = None
    hostname: Optional[str] = None
    comment: Optional[str] = None
    user_data: Any = None
    hold_job: Optional[str] = None
    host_keys: list = field(default_factory=list)
    username: Optional[str] = "zuul"
    shell_type: Optional[str] = None
    python_path: Optional[str] = None
    hold_expiration: Optional[int] = None
    resources: Optional[dict] = None
    attributes: Optional[dict] = None
    tenant_name: Optional[str] = None
    driver_data: Any = None
    requestor: Optional[str] = None
    node_properties: list = field(default_factory=list)
    slot: Optional[int] = None
    # bookkeeping (not stored JSON)
    id: Optional[str] = None
    version: Optional[int] = None
    extra: dict = field(default_factory=dict)

    def _normalise(self):
        super()._normalise()
        if isinstance(self.type, str):
            self.type = [self.type]
        if self.type is None:
            self.type = []
        if self.username is None:
            self.username = "zuul"
        if self.host_keys is None:
            self.host_keys = []
        if self.node_properties is None:
            self.node_properties = []
        if self.connection_port is None:
            self.connection_port = self.ssh_port or 22

    @property
    def labels(self):
        return list(self.type)

    def to_dict(self):
        d = super().to_dict()
        if isinstance(self.connection_port, int):
            d["ssh_port"] = self.connection_port
        return d


@dataclass(eq=False)
class NodeRequest(_Record):
    """A requestor's ask for a set of nodes that must come from one provider pool.

    The id is ``<priority>-<sequence>``; requests are handled in order of
    (priority prefix, relative_priority, sequence).
    """

    _STATE_TYPE = RequestState

    state: Any = RequestState.REQUESTED
    state_time: Optional[float] = None
    declined_by: list = field(default_factory=list)
    node_types: list = field(default_factory=list)
    nodes: list = field(default_factory=list)
    reuse: bool = True
    requestor: Optional[str] = None
    requestor_data: Any = None
    provider: Optional[str] = None
    relative_priority: int = 0
    event_id: Optional[str] = None
    created_time: Optional[float] = None
    tenant_name: Optional[str] = None
    id: Optional[str] = None
    version: Optional[int] = None
    extra: dict = field(default_factory=dict)

    def _normalise(self):
        super()._normalise()
        self.declined_by = list(self.declined_by or [])
        self.node_types = list(self.node_types or [])
        self.nodes = list(self.nodes or [])
        if self.reuse is None:
            self.reuse = True
        if self.relative_priority is None:
            self.relative_priority = 0

    @property
    def priority(self):
        """The 3-digit priority prefix of the id ("100" if the id has none)."""
        if self.id and "-" in self.id:
            return self.id.split("-", 1)[0]
        return "100"

    @property
    def sequence(self):
        if self.id and "-" in self.id:
            return self.id.rsplit("-", 1)[1]
        return self.id or ""

    def sort_key(self):
        return (self.priority, self.relative_priority, self.sequence)


@dataclass(eq=False)
class ImageBuild(_Record):
    """One diskimage build; ``id`` is the build id (uuid4 hex), ``image`` the image name."""

    _STATE_TYPE = BuildState
    _LOCAL = ("id", "version", "extra", "image")

    state: Any = BuildState.BUILDING
    state_time: Optional[float] = None
    builder: Optional[str] = None
    builder_id: Optional[str] = None
    formats: Optional[str] = None
    username: Optional[str] = "zuul"
    python_path: Optional[str] = None
    shell_type: Optional[str] = None
    image: Optional[str] = None
    id: Optional[str] = None
    version: Optional[int] = None
    extra: dict = field(default_factory=dict)

    @property
    def format_list(self):
        return [f for f in (self.formats or "").split(",") if f]

    def to_dict(self):
        d = super().to_dict()
        if not d.get("formats"):
            d.pop("formats", None)
        return d


@dataclass(eq=False)
class ImageUpload(_Record):
    """One upload of a build to one provider; ``id`` is the 10-digit upload sequence."""

    _STATE_TYPE = UploadState
    _LOCAL = ("id", "version", "extra", "image", "build_id", "provider")

    state: Any = UploadState.UPLOADING
    state_time: Optional[float] = None
    external_id: Any = None
    external_name: Optional[str] = None
    format: Optional[str] = None
    username: Optional[str] = "zuul"
    python_path: Optional[str] = None
    shell_type: Optional[str] = None
    image: Optional[str] = None
    build_id: Optional[str] = None
    provider: Optional[str] = None
    id: Optional[str] = None
    version: Optional[int] = None
    extra: dict = field(default_factory=dict)

    @property
    def path(self):
        """The ZooKeeper path Nodepool uses as a node's ``image_id`` for uploaded images."""
        return (f"/nodepool/images/{self.image}/builds/{self.build_id}"
                f"/providers/{self.provider}/images/{self.id}")


@dataclass(eq=False)
class Component(_Record):
    """A registered daemon part: ``launcher``, ``builder`` or ``pool`` (with supported labels)."""

    _LOCAL = ("id", "version", "extra", "kind")

    hostname: Optional[str] = None
    state: Optional[str] = "running"
    version_string: Optional[str] = None
    model_api: int = 0
    # pool components only
    name: Optional[str] = None
    provider_name: Optional[str] = None
    supported_labels: list = field(default_factory=list)
    priority: int = 100
    paused: bool = False
    pool_id: Optional[str] = None
    kind: Optional[str] = None
    id: Optional[str] = None
    version: Optional[int] = None
    extra: dict = field(default_factory=dict)

    @staticmethod
    def _json_key(name):
        # "version" is our compare-and-set counter; the JSON key "version" is the software version.
        return {"version_string": "version", "pool_id": "id"}.get(name, name)

    def to_dict(self):
        d = super().to_dict()
        d["kind"] = self.kind
        if self.kind != "pool":
            for key in ("name", "provider_name", "supported_labels", "priority", "paused", "id"):
                d.pop(key, None)
        return d

    @classmethod
    def from_dict(cls, data, id=None, version=None):
        data = dict(data or {})
        kind = data.pop("kind", None)
        rec = super().from_dict(data, id=id, version=version)
        rec.kind = kind
        return rec
