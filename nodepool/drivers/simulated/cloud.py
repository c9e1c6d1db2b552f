"""The simulated cloud's server side: instances and images kept in a SQLite state file.

Several processes (launchers, the builder, ``nodepool delete --now``) open the same file at once,
the way they would share one real cloud account.  SQLite in WAL mode with ``BEGIN IMMEDIATE``
write transactions makes every change atomic across all of them, so the cloud's quota holds and
no record is lost or torn.  Timestamps are wall-clock (``time.time``) because the file outlives
processes: an instance created by a launcher that died is still there, and still ACTIVE, when the
next launcher starts.

Nothing runs in the background.  An instance's status is computed from its timestamps each time
it is read (``instance_status``): BUILD until ``ready_at``, then ACTIVE (or ERROR when its boot
was drawn to fail at create time), DELETING once a delete was requested, gone after ``gone_at``.

This module models only what the cloud itself does (quota, images, boot and delete progress).
API latency, API errors and rate limiting are the client's experience of the cloud and live in
the adapter.  The ``add_instance``/``update_instance``/``get_instance`` helpers let tests play
another tool using the same account.
"""
import base64
import contextlib
import functools
import hashlib
import ipaddress
import json
import os
import random
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from ...errors import CloudError, PermanentCloudError, QuotaError, TransientCloudError
from ...model.quota import Limits, Resources

BUILD = "BUILD"
ACTIVE = "ACTIVE"
ERROR = "ERROR"
DELETING = "DELETING"
GONE = "GONE"

IMAGE_SAVING = "saving"
IMAGE_ACTIVE = "active"

REGION = "sim-region-1"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused: addresses stay unique
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    image_id TEXT,
    az TEXT,
    region TEXT,
    cores INTEGER NOT NULL,
    ram INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    created_at REAL NOT NULL,
    ready_at REAL NOT NULL,
    fails INTEGER NOT NULL DEFAULT 0,
    delete_at REAL,
    gone_at REAL
);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    format TEXT,
    size INTEGER,
    md5 TEXT,
    sha256 TEXT,
    metadata TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_calls (
    operation TEXT PRIMARY KEY,
    calls INTEGER NOT NULL,
    errors INTEGER NOT NULL
);
"""

_INSTANCE_COLUMNS = ("seq, id, name, image_id, az, region, cores, ram, metadata, created_at, "
                     "ready_at, fails, delete_at, gone_at")
_IMAGE_COLUMNS = "id, name, format, size, md5, sha256, metadata, status, created_at"


# -- pure rules ----------------------------------------------------------------------------------

def instance_status(ready_at, fails, delete_at, gone_at, now):
    """What the cloud reports for an instance at ``now`` (see the module docstring)."""
    if delete_at is not None:
        return GONE if gone_at is not None and now >= gone_at else DELETING
    if now < ready_at:
        return BUILD
    return ERROR if fails else ACTIVE


def quota_refusal(limits, used, need):
    """The cloud's 403 message when ``need`` on top of ``used`` breaks ``limits``, else None."""
    for name in ("instances", "cores", "ram"):
        limit = limits.get(name)
        if limit is None or not need.get(name):
            continue
        if used.get(name, 0) + need[name] > limit:
            return (f"Quota exceeded for {name}: requested {need[name]}, "
                    f"{used.get(name, 0)} of {limit} already used")
    return None


@functools.lru_cache(maxsize=1 << 16)
def addresses_for(seq):
    """Fake but valid addresses from documentation ranges: (private v4, public v4, public v6).
    Cached: every listing of a large cloud asks again for each instance."""
    host = (seq - 1) % 254 + 1
    v6 = ipaddress.IPv6Address(int(ipaddress.IPv6Address("2001:db8::")) + seq)
    return f"192.0.2.{host}", f"203.0.113.{host}", str(v6)


def host_keys_for(instance_id):
    """A well-formed ``ssh-ed25519`` public key line derived from the id (no real key pair)."""
    return list(_host_keys(instance_id))


@functools.lru_cache(maxsize=1 << 16)
def _host_keys(instance_id):
    key_type = b"ssh-ed25519"
    material = hashlib.sha256(instance_id.encode()).digest()
    blob = (len(key_type).to_bytes(4, "big") + key_type
            + len(material).to_bytes(4, "big") + material)
    return (f"ssh-ed25519 {base64.b64encode(blob).decode()}",)


# -- records -------------------------------------------------------------------------------------

@dataclass
class CloudInstance:
    """One server as the cloud's API describes it."""
    id: str
    name: str
    status: str
    image_id: Optional[str]
    az: Optional[str]
    region: Optional[str]
    cores: int
    ram: int
    metadata: dict
    created_at: float
    ready_at: float
    private_ipv4: str
    public_ipv4: str
    public_ipv6: str
    host_id: str
    host_keys: list = field(default_factory=list)

    @property
    def resources(self):
        return Resources.of(instances=1, cores=self.cores, ram=self.ram)


@dataclass
class CloudImage:
    """One image in the cloud's image service."""
    id: str
    name: str
    format: Optional[str]
    size: int
    md5: Optional[str]
    sha256: Optional[str]
    metadata: dict
    status: str
    created_at: float


def _instance_from_row(row, now):
    (seq, iid, name, image_id, az, region, cores, ram, metadata, created_at, ready_at, fails,
     delete_at, gone_at) = row
    private, public, v6 = addresses_for(seq)
    return CloudInstance(
        id=iid, name=name, status=instance_status(ready_at, fails, delete_at, gone_at, now),
        image_id=image_id, az=az, region=region, cores=cores, ram=ram,
        metadata=json.loads(metadata), created_at=created_at, ready_at=ready_at,
        private_ipv4=private, public_ipv4=public, public_ipv6=v6,
        host_id=f"sim-hypervisor-{seq % 8}", host_keys=host_keys_for(iid))


def _instance_copy(inst):
    """A copy of ``inst`` whose metadata and host keys can be changed on their own."""
    new = object.__new__(CloudInstance)
    new.__dict__.update(inst.__dict__)
    new.metadata = dict(inst.metadata)
    new.host_keys = list(inst.host_keys)
    return new


def _image_from_row(row):
    iid, name, fmt, size, md5, sha256, metadata, status, created_at = row
    return CloudImage(id=iid, name=name, format=fmt, size=size, md5=md5, sha256=sha256,
                      metadata=json.loads(metadata), status=status, created_at=created_at)


# -- the cloud -----------------------------------------------------------------------------------

class SimulatedCloud:
    """The cloud behind one state file.  Every public method is one API call's worth of work."""

    def __init__(self, path, *, boot_time=1.0, delete_time=0.0, boot_failure_rate=0.0,
                 quota=None, rng=None, region=REGION, clock=time.time):
        self.path = str(path)
        self._parsed = {}            # instance id -> (row, CloudInstance) of the last listing
        self.boot_time = boot_time
        self.delete_time = delete_time
        self.boot_failure_rate = boot_failure_rate
        self.quota = Limits.of(**(quota or {}))
        self.rng = rng or random.Random()
        self.region = region
        self.clock = clock
        self._lock = threading.RLock()
        self._conn = None
        self._pid = None

    # -- connection ------------------------------------------------------------------------------

    def close(self):
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def _connection(self):
        """The open connection, opened (and the schema created) on first use in this process."""
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                               check_same_thread=False)
        try:
            self._set_wal(conn)
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise PermanentCloudError(
                f"simulated cloud state file {self.path} cannot be used: {exc}") from exc
        if version > SCHEMA_VERSION:
            conn.close()
            raise PermanentCloudError(f"simulated cloud state file {self.path} has schema "
                                      f"version {version}, newer than this code ({SCHEMA_VERSION})")
        self._conn, self._pid = conn, os.getpid()
        return conn

    @staticmethod
    def _set_wal(conn):
        """Switch to WAL; two processes opening a new file at once may briefly see it locked."""
        for _ in range(100):
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc):
                    raise
                time.sleep(0.05)
        conn.execute("PRAGMA journal_mode=WAL")

    @contextlib.contextmanager
    def _read(self):
        with self._lock, self._db_errors():
            yield self._connection()

    @contextlib.contextmanager
    def _write(self):
        """One atomic write transaction; expired instances are purged at its start."""
        with self._lock, self._db_errors():
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("DELETE FROM instances WHERE gone_at IS NOT NULL AND gone_at <= ?",
                             (self.clock(),))
                yield conn
            except BaseException:
                if conn.in_transaction:      # SQLite may already have rolled back (disk full)
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def _db_errors(self):
        try:
            yield
        except sqlite3.OperationalError as exc:
            raise TransientCloudError(
                f"simulated cloud state file {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise CloudError(f"simulated cloud state file {self.path}: {exc}") from exc

    # -- instances -------------------------------------------------------------------------------

    def create_instance(self, name, *, cores, ram, metadata, image_id=None,
                        uploaded_image=False, az=None, enforce_quota=True, fails=None,
                        boot_time=None):
        """Create a server (status BUILD, or ACTIVE at once when boot-time is 0).

        ``uploaded_image``: ``image_id`` must name an active image of this cloud.  Raises
        ``QuotaError`` when the account's quota would be exceeded (instances being deleted still
        count, as in real clouds) and ``PermanentCloudError`` for a missing image."""
        if fails is None:
            fails = bool(self.boot_failure_rate) and self.rng.random() < self.boot_failure_rate
        boot_time = self.boot_time if boot_time is None else boot_time
        instance_id = f"sim-{uuid.uuid4()}"
        with self._write() as conn:
            if uploaded_image:
                row = conn.execute("SELECT status FROM images WHERE id = ?",
                                   (image_id,)).fetchone()
                if row is None or row[0] != IMAGE_ACTIVE:
                    state = "not found" if row is None else f"not active ({row[0]})"
                    raise PermanentCloudError(f"image {image_id} {state} in simulated cloud "
                                              f"{self.path}")
            if enforce_quota and self.quota:
                count, cores_used, ram_used = conn.execute(
                    "SELECT COUNT(*), COALESCE(SUM(cores), 0), COALESCE(SUM(ram), 0) "
                    "FROM instances").fetchone()
                refusal = quota_refusal(self.quota,
                                        Resources.of(count, cores_used, ram_used),
                                        Resources.of(1, cores, ram))
                if refusal:
                    raise QuotaError(refusal)
            now = self.clock()
            conn.execute(
                f"INSERT INTO instances ({_INSTANCE_COLUMNS}) "
                "VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
                (instance_id, name, image_id, az, self.region, cores, ram,
                 json.dumps(metadata or {}, sort_keys=True), now, now + boot_time, int(fails)))
            row = conn.execute(f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE id = ?",
                               (instance_id,)).fetchone()
        return _instance_from_row(row, now)

    def list_instances(self, shared=False):
        """Every instance that is not gone (deleting ones included, status DELETING).

        A listing of ten thousand instances is what every launcher's leak scan and quota view
        asks for: rows that did not change since the last listing are not parsed again, and
        their objects are kept (a new one only when the status, which moves with the clock,
        changed).  ``shared``: hand out those kept objects themselves, for a caller that only
        reads them (the adapter's listing: an unchanged fleet then allocates nothing per
        instance); otherwise each is a copy the caller may change."""
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_INSTANCE_COLUMNS} FROM instances "
                                "ORDER BY seq").fetchall()
        now = self.clock()
        parsed, kept = self._parsed, {}
        out = []
        for row in rows:
            known = parsed.get(row[1])
            status = instance_status(row[10], row[11], row[12], row[13], now)
            if known is None or known[0] != row:
                inst = _instance_from_row(row, now)
            else:
                inst = known[1]
                if inst.status != status:
                    inst = _instance_copy(inst)    # the old object may be in a caller's hands
                    inst.status = status
            kept[row[1]] = (row, inst)
            if status != GONE:
                out.append(inst if shared else _instance_copy(inst))
        self._parsed = kept
        return out

    def get_instance(self, instance_id):
        """One instance, or None when it does not exist (any more)."""
        with self._read() as conn:
            row = conn.execute(f"SELECT {_INSTANCE_COLUMNS} FROM instances WHERE id = ?",
                               (instance_id,)).fetchone()
        if row is None:
            return None
        inst = _instance_from_row(row, self.clock())
        return None if inst.status == GONE else inst

    def delete_instance(self, instance_id):
        """Request a delete: ``"missing"``, ``"deleted"`` (gone at once) or ``"deleting"``."""
        with self._write() as conn:
            row = conn.execute("SELECT delete_at FROM instances WHERE id = ?",
                               (instance_id,)).fetchone()
            if row is None:
                return "missing"
            if row[0] is not None:
                return "deleting"      # a second delete does not restart the clock
            if self.delete_time <= 0:
                conn.execute("DELETE FROM instances WHERE id = ?", (instance_id,))
                return "deleted"
            now = self.clock()
            conn.execute("UPDATE instances SET delete_at = ?, gone_at = ? WHERE id = ?",
                         (now, now + self.delete_time, instance_id))
        return "deleting"

    # -- API call accounting (the provider's ``count-api-calls``) ---------------------------------

    def record_api_call(self, operation, failed=False):
        """Count one API call a client made (``failed``: it was answered with an error), so
        tests can tell how many calls every process together made per node."""
        with self._write() as conn:
            conn.execute("INSERT INTO api_calls (operation, calls, errors) VALUES (?, 1, ?) "
                         "ON CONFLICT(operation) DO UPDATE SET calls = calls + 1, "
                         "errors = errors + excluded.errors", (operation, int(failed)))

    def api_call_counts(self):
        """``{operation: (calls, errors)}`` recorded so far by every client of this file."""
        with self._read() as conn:
            rows = conn.execute("SELECT operation, calls, errors FROM api_calls").fetchall()
        return {op: (calls, errors) for op, calls, errors in rows}

    # -- helpers for tests (another tool using the same account) ---------------------------------

    def add_instance(self, name="foreign", *, metadata=None, cores=1, ram=1024, ready=True,
                     fails=False, enforce_quota=False):
        """Create an instance the way some other tool would (untagged unless ``metadata``)."""
        return self.create_instance(name, cores=cores, ram=ram, metadata=metadata or {},
                                    enforce_quota=enforce_quota, fails=fails,
                                    boot_time=0 if ready else 3600)

    def update_instance(self, instance_id, *, metadata=None, fails=None, ready_at=None):
        """Change an instance behind everyone's back (tags, boot outcome, ready time)."""
        sets, args = [], []
        if metadata is not None:
            sets.append("metadata = ?")
            args.append(json.dumps(metadata, sort_keys=True))
        if fails is not None:
            sets.append("fails = ?")
            args.append(int(fails))
        if ready_at is not None:
            sets.append("ready_at = ?")
            args.append(ready_at)
        if not sets:
            return
        with self._write() as conn:
            conn.execute(f"UPDATE instances SET {', '.join(sets)} WHERE id = ?",
                         (*args, instance_id))

    def usage(self):
        """Resources held by every instance that is not gone (what quota is checked against)."""
        return Resources.total(i.resources for i in self.list_instances())

    # -- images ----------------------------------------------------------------------------------

    def create_image(self, name, *, image_format, size, md5, sha256, metadata,
                     status=IMAGE_SAVING):
        """Register an image (``saving`` while its data uploads); returns the ``CloudImage``."""
        image = CloudImage(id=f"sim-img-{uuid.uuid4()}", name=name, format=image_format,
                           size=size, md5=md5, sha256=sha256, metadata=dict(metadata or {}),
                           status=status, created_at=self.clock())
        with self._write() as conn:
            conn.execute(f"INSERT INTO images ({_IMAGE_COLUMNS}) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (image.id, image.name, image.format, image.size, image.md5,
                          image.sha256, json.dumps(image.metadata, sort_keys=True),
                          image.status, image.created_at))
        return image

    def set_image_status(self, image_id, status):
        """Mark an image ``active`` once its data is in; False when the image is gone."""
        with self._write() as conn:
            cur = conn.execute("UPDATE images SET status = ? WHERE id = ?", (status, image_id))
            return cur.rowcount > 0

    def delete_image(self, image_id):
        """Remove an image; False when it did not exist."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM images WHERE id = ?", (image_id,))
            return cur.rowcount > 0

    def list_images(self):
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_IMAGE_COLUMNS} FROM images "
                                "ORDER BY created_at, id").fetchall()
        return [_image_from_row(row) for row in rows]

    def get_image(self, image_id):
        with self._read() as conn:
            row = conn.execute(f"SELECT {_IMAGE_COLUMNS} FROM images WHERE id = ?",
                               (image_id,)).fetchone()
        return _image_from_row(row) if row else None
