"""The embedded state store: one SQLite file (WAL) shared by every process on one host.

It behaves like the ZooKeeper store so the daemons cannot tell them apart:

* Each store object owns a *session* row with its PID, the process start time (so a reused PID
  is not mistaken for a live one) and a heartbeat.  A session is dead when its heartbeat is older
  than ``session_timeout`` or, on this host, its process is gone; a dead session's locks,
  ephemeral requests and component registrations are removed by whichever process notices first.
  A ``kill -9``'d launcher therefore loses its locks within one heartbeat, not a timeout.
* Locks are rows keyed by Nodepool's lock paths.
* ``watch()`` wakes on any process's commit: a poller thread reads ``PRAGMA data_version``
  every ``poll_interval`` (a few microseconds per check) while at least one watcher exists.
* ``list_nodes``/``list_requests`` keep parsed records in memory and reread only rows whose
  change counter moved, so a launcher with 10,000 nodes does not reparse them every loop.
"""
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid

from ..errors import ConflictError, LockError, NotFoundError, SessionLostError, StoreError
from ..model.records import Component, ImageBuild, ImageUpload, Node, NodeRequest
from .base import ChangeWatcher, Lock, StateStore

log = logging.getLogger("nodepool.store.sqlite")

BUSY_TIMEOUT_MS = 5000
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, pid INTEGER, pstart TEXT, hostname TEXT, heartbeat REAL);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY, data TEXT NOT NULL, version INTEGER NOT NULL, gen INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, data TEXT NOT NULL, version INTEGER NOT NULL, gen INTEGER NOT NULL,
    session TEXT);
CREATE INDEX IF NOT EXISTS requests_session ON requests(session);
CREATE TABLE IF NOT EXISTS locks (
    path TEXT PRIMARY KEY, session TEXT NOT NULL, identifier TEXT, acquired REAL);
CREATE INDEX IF NOT EXISTS locks_session ON locks(session);
CREATE TABLE IF NOT EXISTS builds (
    image TEXT NOT NULL, id TEXT NOT NULL, data TEXT NOT NULL, version INTEGER NOT NULL,
    seq INTEGER NOT NULL, PRIMARY KEY (image, id));
CREATE TABLE IF NOT EXISTS uploads (
    image TEXT NOT NULL, build_id TEXT NOT NULL, provider TEXT NOT NULL, id TEXT NOT NULL,
    data TEXT NOT NULL, version INTEGER NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (image, build_id, provider, id));
CREATE TABLE IF NOT EXISTS upload_seq (
    image TEXT NOT NULL, build_id TEXT NOT NULL, provider TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (image, build_id, provider));
CREATE TABLE IF NOT EXISTS image_flags (
    image TEXT NOT NULL, flag TEXT NOT NULL, created REAL, PRIMARY KEY (image, flag));
CREATE TABLE IF NOT EXISTS components (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, data TEXT NOT NULL, version INTEGER NOT NULL,
    session TEXT NOT NULL);
"""


def _process_start(pid):
    """The kernel's start time of ``pid`` (guards against PID reuse), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SQLiteStore(StateStore):
    def __init__(self, path, session_timeout=10.0, hostname=None, poll_interval=0.005):
        self.path = os.path.abspath(path)
        self.session_timeout = float(session_timeout)
        self.hostname = hostname or socket.gethostname()
        self.poll_interval = poll_interval
        self._local = threading.local()
        self._connections = []
        self._conn_lock = threading.Lock()
        self._session = None
        self._pid = os.getpid()
        self._pstart = _process_start(self._pid)
        self._stop = threading.Event()
        self._threads = []
        self._watchers = []
        self._watch_lock = threading.Lock()
        self._watch_started = False
        self._components = {}           # id -> Component we registered
        self._cache_lock = threading.Lock()
        self._node_cache = {}           # id -> (gen, Node)
        self._request_cache = {}
        self._gens = {"nodes": -1, "requests": -1}
        self._started = False

    # -- connections -------------------------------------------------------------------------------

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._conn_lock:
                self._connections.append(conn)
        return conn

    def _connect(self):
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous=NORMAL")
            return conn
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    def _error(self, exc):
        text = str(exc)
        if isinstance(exc, StoreError):
            return exc
        if "not a database" in text or "malformed" in text or "file is encrypted" in text:
            return StoreError(f"state store {self.path} is not a valid SQLite database "
                              f"(corrupt or another kind of file): {text}")
        if "locked" in text or "busy" in text:
            return StoreError(f"state store {self.path} is locked by another process "
                              f"(waited {BUSY_TIMEOUT_MS / 1000:g}s): {text}")
        if "unable to open" in text or "readonly" in text or "read-only" in text:
            return StoreError(f"cannot open state store {self.path} for writing: {text} "
                              f"(check the directory exists and is writable)")
        return StoreError(f"state store {self.path}: {text}")

    def _tx(self, fn, immediate=True):
        """Run ``fn(conn)`` in one transaction; SQLite errors become one-line StoreErrors."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result
        except sqlite3.Error as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise self._error(exc) from None

    def _read(self, sql, args=()):
        try:
            return self._conn().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self):
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the directory of state store {self.path}: "
                             f"{exc.strerror}") from None
        if os.path.exists(self.path) and not os.access(self.path, os.R_OK | os.W_OK):
            raise StoreError(f"cannot open state store {self.path}: permission denied")
        conn = self._conn()
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning("state store %s: journal mode is %s, not WAL", self.path, mode)
            conn.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        self._open_session()
        self._started = True
        hb = threading.Thread(target=self._heartbeat_loop, name="store-heartbeat", daemon=True)
        hb.start()
        self._threads.append(hb)
        return self

    def _open_session(self):
        sid = f"{self.hostname}-{self._pid}-{uuid.uuid4().hex[:12]}"

        def fn(conn):
            conn.execute("INSERT INTO sessions VALUES (?,?,?,?,?)",
                         (sid, self._pid, self._pstart, self.hostname, time.time()))
            self._reap(conn)
        self._tx(fn)
        self._session = sid

    def stop(self):
        if not self._started:
            return
        self._started = False
        self._stop.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(5)
        sid = self._session
        try:
            self._tx(lambda conn: self._drop_session(conn, sid))
        except StoreError as exc:
            log.warning("could not remove our session from %s: %s", self.path, exc)
        with self._conn_lock:
            for conn in self._connections:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._connections.clear()
        self._local = threading.local()

    @property
    def session_id(self):
        return self._session

    def _drop_session(self, conn, sid):
        changed = conn.execute("DELETE FROM requests WHERE session=?", (sid,)).rowcount
        if changed:
            self._bump(conn, "requests")
        conn.execute("DELETE FROM locks WHERE session=?", (sid,))
        conn.execute("DELETE FROM components WHERE session=?", (sid,))
        conn.execute("DELETE FROM sessions WHERE id=?", (sid,))

    def _alive(self, row, now):
        sid, pid, pstart, hostname, heartbeat = row
        if heartbeat is None or now - heartbeat > self.session_timeout:
            return False
        if hostname == self.hostname:
            if pid == self._pid:
                return pstart == self._pstart or sid == self._session
            if not _pid_alive(pid):
                return False
            started = _process_start(pid)
            if started is not None and pstart is not None and started != pstart:
                return False
        return True

    def _live_sessions(self, conn=None):
        rows = (conn or self._conn()).execute("SELECT * FROM sessions").fetchall()
        now = time.time()
        return {row[0] for row in rows if self._alive(row, now)}, {row[0] for row in rows}

    def _reap(self, conn):
        live, every = self._live_sessions(conn)
        for sid in every - live:
            log.info("state store: session %s is gone; releasing its locks and ephemerals", sid)
            self._drop_session(conn, sid)

    def _heartbeat_loop(self):
        interval = max(0.2, self.session_timeout / 3)
        while not self._stop.wait(interval):
            try:
                lost = self._tx(self._beat)
            except StoreError as exc:
                log.warning("state store heartbeat failed: %s", exc)
                continue
            if lost:
                self._recover_session()

    def _beat(self, conn):
        cur = conn.execute("UPDATE sessions SET heartbeat=? WHERE id=?",
                           (time.time(), self._session))
        if cur.rowcount == 0:
            return True
        self._reap(conn)
        return False

    def _recover_session(self):
        log.error("state store session %s was expired by another process (were we frozen?); "
                  "our locks and ephemeral records are gone", self._session)
        self._notify_session("lost")
        self._open_session()
        for comp in list(self._components.values()):
            self._insert_component(comp)
        self._notify_session("connected")

    # -- change notification ----------------------------------------------------------------------

    def watch(self):
        watcher = ChangeWatcher()
        with self._watch_lock:
            self._watchers.append(watcher)
            if not self._watch_started:
                self._watch_started = True
                t = threading.Thread(target=self._poll_loop, name="store-watch", daemon=True)
                t.start()
                self._threads.append(t)
        return watcher

    def _poll_loop(self):
        conn = self._connect()
        last = None
        try:
            while not self._stop.wait(self.poll_interval):
                try:
                    version = conn.execute("PRAGMA data_version").fetchone()[0]
                except sqlite3.Error:
                    continue
                if version != last:
                    if last is not None:
                        self._notify_watchers()
                    last = version
        finally:
            conn.close()

    def _notify_watchers(self):
        with self._watch_lock:
            watchers = list(self._watchers)
        for w in watchers:
            w.notify()

    # -- generic record helpers --------------------------------------------------------------------

    def _bump(self, conn, table):
        conn.execute("INSERT INTO meta VALUES (?, 1) ON CONFLICT(key) DO UPDATE SET "
                     "value = value + 1", (f"gen:{table}",))
        return conn.execute("SELECT value FROM meta WHERE key=?", (f"gen:{table}",)).fetchone()[0]

    def _next(self, conn, key):
        conn.execute("INSERT INTO meta VALUES (?, 1) ON CONFLICT(key) DO UPDATE SET "
                     "value = value + 1", (key,))
        return conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0]

    def _check_session(self):
        if not self._started or self._session is None:
            raise SessionLostError(f"state store {self.path} is not started")

    def _write_record(self, table, record, check_version, extra_where=""):
        data = json.dumps(record.to_dict())

        def fn(conn):
            row = conn.execute(f"SELECT version FROM {table} WHERE id=?", (record.id,)).fetchone()
            if row is None:
                raise NotFoundError(f"{table[:-1]} {record.id} does not exist")
            if check_version and record.version is not None and row[0] != record.version:
                raise ConflictError(f"{table[:-1]} {record.id} changed (version {row[0]}, "
                                    f"ours {record.version})")
            gen = self._bump(conn, table)
            conn.execute(f"UPDATE {table} SET data=?, version=?, gen=? WHERE id=?",
                         (data, row[0] + 1, gen, record.id))
            return row[0] + 1
        record.version = self._tx(fn)
        self._notify_watchers()
        return record

    def _cached_list(self, table, cls, cache):
        """All records of ``table``, reparsing only rows whose ``gen`` changed."""
        rows = self._read(f"SELECT value FROM meta WHERE key=?", (f"gen:{table}",))
        gen = rows[0][0] if rows else 0
        with self._cache_lock:
            if gen != self._gens[table]:
                current = self._read(f"SELECT id, gen FROM {table}")
                ids = {rid: g for rid, g in current}
                for rid in list(cache):
                    if rid not in ids:
                        del cache[rid]
                stale = [rid for rid, g in ids.items() if rid not in cache or cache[rid][0] != g]
                if stale:
                    if len(stale) > 500:
                        fetched = self._read(f"SELECT id, data, version, gen FROM {table}")
                    else:
                        marks = ",".join("?" * len(stale))
                        fetched = self._read(
                            f"SELECT id, data, version, gen FROM {table} WHERE id IN ({marks})",
                            stale)
                    for rid, data, version, g in fetched:
                        if rid in stale:
                            cache[rid] = (g, cls.from_dict(json.loads(data), id=rid,
                                                           version=version))
                self._gens[table] = gen
            return [rec.copy() for _, rec in cache.values()]

    # -- nodes -------------------------------------------------------------------------------------

    def create_node(self, node):
        self._check_session()
        now = time.time()
        node.created_time = node.created_time or now
        node.state_time = node.state_time or now

        def fn(conn):
            seq = self._next(conn, "seq:node")
            node.id = f"{seq:010d}"
            gen = self._bump(conn, "nodes")
            conn.execute("INSERT INTO nodes VALUES (?,?,?,?)",
                         (node.id, json.dumps(node.to_dict()), 1, gen))
        self._tx(fn)
        node.version = 1
        self._notify_watchers()
        return node

    def get_node(self, node_id):
        rows = self._read("SELECT data, version FROM nodes WHERE id=?", (str(node_id),))
        if not rows:
            return None
        return Node.from_dict(json.loads(rows[0][0]), id=str(node_id), version=rows[0][1])

    def list_nodes(self):
        return sorted(self._cached_list("nodes", Node, self._node_cache), key=lambda n: n.id)

    def update_node(self, node, check_version=False):
        return self._write_record("nodes", node, check_version)

    def delete_node(self, node_id):
        def fn(conn):
            if conn.execute("DELETE FROM nodes WHERE id=?", (str(node_id),)).rowcount:
                self._bump(conn, "nodes")
            conn.execute("DELETE FROM locks WHERE path=?", (f"/nodepool/nodes/{node_id}/lock",))
        self._tx(fn)
        self._notify_watchers()

    # -- requests ----------------------------------------------------------------------------------

    def submit_request(self, request, priority="100", ephemeral=True):
        self._check_session()
        priority = str(priority)
        if len(priority) != 3 or not priority.isdigit():
            raise ValueError(f"request priority must be 3 digits, not {priority!r}")
        now = time.time()
        request.created_time = request.created_time or now
        request.state_time = request.state_time or now

        def fn(conn):
            seq = self._next(conn, "seq:request")
            request.id = f"{priority}-{seq:010d}"
            gen = self._bump(conn, "requests")
            conn.execute("INSERT INTO requests VALUES (?,?,?,?,?)",
                         (request.id, json.dumps(request.to_dict()), 1, gen,
                          self._session if ephemeral else None))
        self._tx(fn)
        request.version = 1
        self._notify_watchers()
        return request

    def get_request(self, request_id):
        rows = self._read("SELECT data, version FROM requests WHERE id=?", (request_id,))
        if not rows:
            return None
        return NodeRequest.from_dict(json.loads(rows[0][0]), id=request_id, version=rows[0][1])

    def list_requests(self):
        return sorted(self._cached_list("requests", NodeRequest, self._request_cache),
                      key=NodeRequest.sort_key)

    def update_request(self, request, check_version=False):
        return self._write_record("requests", request, check_version)

    def delete_request(self, request_id):
        def fn(conn):
            if conn.execute("DELETE FROM requests WHERE id=?", (request_id,)).rowcount:
                self._bump(conn, "requests")
        self._tx(fn)
        self._notify_watchers()

    # -- locks -------------------------------------------------------------------------------------

    def lock(self, path, blocking=False, timeout=None, identifier=None):
        self._check_session()
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while True:
            if self._try_lock(path, identifier):
                return Lock(self, path, self._session)
            if not blocking or (deadline is not None and time.monotonic() >= deadline):
                raise LockError(f"lock {path} is held by another process")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _try_lock(self, path, identifier):
        sid = self._session

        def fn(conn):
            row = conn.execute("SELECT session FROM locks WHERE path=?", (path,)).fetchone()
            if row is not None:
                if row[0] == sid:
                    raise LockError(f"lock {path} is already held by this process "
                                    f"(locks are not re-entrant)")
                srow = conn.execute("SELECT * FROM sessions WHERE id=?", (row[0],)).fetchone()
                if srow is not None and self._alive(srow, time.time()):
                    return False
                conn.execute("DELETE FROM locks WHERE path=?", (path,))
            conn.execute("INSERT INTO locks VALUES (?,?,?,?)",
                         (path, sid, identifier, time.time()))
            return True
        got = self._tx(fn)
        if got:
            self._notify_watchers()
        return got

    def _release(self, lock):
        try:
            self._tx(lambda conn: conn.execute(
                "DELETE FROM locks WHERE path=? AND session=?", (lock.path, lock.token)))
        except StoreError as exc:
            log.warning("releasing %s failed: %s", lock.path, exc)
        self._notify_watchers()

    def is_locked(self, path):
        rows = self._read("SELECT session FROM locks WHERE path=?", (path,))
        if not rows:
            return False
        live, _ = self._live_sessions()
        return rows[0][0] in live

    def _locked_ids(self, prefix, suffix=""):
        rows = self._read("SELECT path, session FROM locks WHERE path LIKE ?",
                          (prefix + "%" + suffix,))
        if not rows:
            return set()
        live, _ = self._live_sessions()
        out = set()
        for path, sid in rows:
            if sid in live:
                rest = path[len(prefix):]
                out.add(rest[:-len(suffix)] if suffix else rest)
        return out

    def locked_node_ids(self):
        return self._locked_ids("/nodepool/nodes/", "/lock")

    def locked_request_ids(self):
        return self._locked_ids("/nodepool/requests-lock/")

    # -- images ------------------------------------------------------------------------------------

    def create_build(self, build):
        build.id = build.id or uuid.uuid4().hex
        build.state_time = build.state_time or time.time()

        def fn(conn):
            seq = self._next(conn, "seq:build")
            try:
                conn.execute("INSERT INTO builds VALUES (?,?,?,?,?)",
                             (build.image, build.id, json.dumps(build.to_dict()), 1, seq))
            except sqlite3.IntegrityError:
                raise ConflictError(f"build {build.image}-{build.id} already exists") from None
        self._tx(fn)
        build.version = 1
        self._notify_watchers()
        return build

    def _build(self, image, bid, data, version):
        b = ImageBuild.from_dict(json.loads(data), id=bid, version=version)
        b.image = image
        return b

    def get_build(self, image, build_id):
        rows = self._read("SELECT data, version FROM builds WHERE image=? AND id=?",
                          (image, build_id))
        return self._build(image, build_id, *rows[0]) if rows else None

    def list_builds(self, image=None):
        if image is None:
            rows = self._read("SELECT image, id, data, version FROM builds ORDER BY seq")
        else:
            rows = self._read("SELECT image, id, data, version FROM builds WHERE image=? "
                              "ORDER BY seq", (image,))
        return [self._build(*row) for row in rows]

    def update_build(self, build, check_version=False):
        data = json.dumps(build.to_dict())

        def fn(conn):
            row = conn.execute("SELECT version FROM builds WHERE image=? AND id=?",
                               (build.image, build.id)).fetchone()
            if row is None:
                raise NotFoundError(f"build {build.image}-{build.id} does not exist")
            if check_version and build.version is not None and row[0] != build.version:
                raise ConflictError(f"build {build.image}-{build.id} changed")
            conn.execute("UPDATE builds SET data=?, version=? WHERE image=? AND id=?",
                         (data, row[0] + 1, build.image, build.id))
            return row[0] + 1
        build.version = self._tx(fn)
        self._notify_watchers()
        return build

    def delete_build(self, image, build_id):
        def fn(conn):
            conn.execute("DELETE FROM uploads WHERE image=? AND build_id=?", (image, build_id))
            conn.execute("DELETE FROM upload_seq WHERE image=? AND build_id=?", (image, build_id))
            conn.execute("DELETE FROM builds WHERE image=? AND id=?", (image, build_id))
        self._tx(fn)
        self._notify_watchers()

    def create_upload(self, upload):
        upload.state_time = upload.state_time or time.time()

        def fn(conn):
            key = (upload.image, upload.build_id, upload.provider)
            conn.execute("INSERT INTO upload_seq VALUES (?,?,?,1) ON CONFLICT DO UPDATE SET "
                         "seq = seq + 1", key)
            seq = conn.execute("SELECT seq FROM upload_seq WHERE image=? AND build_id=? AND "
                               "provider=?", key).fetchone()[0]
            upload.id = f"{seq:010d}"
            order = self._next(conn, "seq:upload")
            conn.execute("INSERT INTO uploads VALUES (?,?,?,?,?,?,?)",
                         (*key, upload.id, json.dumps(upload.to_dict()), 1, order))
        self._tx(fn)
        upload.version = 1
        self._notify_watchers()
        return upload

    def _upload(self, image, build_id, provider, uid, data, version):
        u = ImageUpload.from_dict(json.loads(data), id=uid, version=version)
        u.image, u.build_id, u.provider = image, build_id, provider
        return u

    def get_upload(self, image, build_id, provider, upload_id):
        rows = self._read("SELECT data, version FROM uploads WHERE image=? AND build_id=? AND "
                          "provider=? AND id=?", (image, build_id, provider, upload_id))
        return self._upload(image, build_id, provider, upload_id, *rows[0]) if rows else None

    def list_uploads(self, image=None, build_id=None, provider=None):
        where, args = [], []
        for col, val in (("image", image), ("build_id", build_id), ("provider", provider)):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        sql = "SELECT image, build_id, provider, id, data, version FROM uploads"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [self._upload(*row) for row in self._read(sql + " ORDER BY seq", args)]

    def update_upload(self, upload, check_version=False):
        data = json.dumps(upload.to_dict())
        key = (upload.image, upload.build_id, upload.provider, upload.id)

        def fn(conn):
            row = conn.execute("SELECT version FROM uploads WHERE image=? AND build_id=? AND "
                               "provider=? AND id=?", key).fetchone()
            if row is None:
                raise NotFoundError(f"upload {'/'.join(key)} does not exist")
            if check_version and upload.version is not None and row[0] != upload.version:
                raise ConflictError(f"upload {'/'.join(key)} changed")
            conn.execute("UPDATE uploads SET data=?, version=? WHERE image=? AND build_id=? AND "
                         "provider=? AND id=?", (data, row[0] + 1, *key))
            return row[0] + 1
        upload.version = self._tx(fn)
        self._notify_watchers()
        return upload

    def delete_upload(self, image, build_id, provider, upload_id):
        self._tx(lambda conn: conn.execute(
            "DELETE FROM uploads WHERE image=? AND build_id=? AND provider=? AND id=?",
            (image, build_id, provider, upload_id)))
        self._notify_watchers()

    def list_image_names(self):
        rows = self._read("SELECT image FROM builds UNION SELECT image FROM image_flags")
        return sorted(r[0] for r in rows)

    def _set_flag(self, image, flag, present):
        if present:
            sql, args = ("INSERT INTO image_flags VALUES (?,?,?) ON CONFLICT DO NOTHING",
                         (image, flag, time.time()))
        else:
            sql, args = "DELETE FROM image_flags WHERE image=? AND flag=?", (image, flag)
        self._tx(lambda conn: conn.execute(sql, args))
        self._notify_watchers()

    def _flag(self, image, flag):
        rows = self._read("SELECT created FROM image_flags WHERE image=? AND flag=?",
                          (image, flag))
        return rows[0][0] if rows else None

    def set_image_paused(self, image, paused):
        self._set_flag(image, "pause", paused)

    def is_image_paused(self, image):
        return self._flag(image, "pause") is not None

    def request_image_build(self, image):
        self._set_flag(image, "request-build", True)

    def get_image_build_request(self, image):
        return self._flag(image, "request-build")

    def remove_image_build_request(self, image):
        self._set_flag(image, "request-build", False)

    # -- components --------------------------------------------------------------------------------

    def register_component(self, component):
        self._check_session()

        def fn(conn):
            seq = self._next(conn, "seq:component")
            component.id = f"{component.hostname or self.hostname}{seq:010d}"
        self._tx(fn)
        self._insert_component(component)
        self._components[component.id] = component
        return component

    def _insert_component(self, component):
        self._tx(lambda conn: conn.execute(
            "INSERT OR REPLACE INTO components VALUES (?,?,?,?,?)",
            (component.id, component.kind, json.dumps(component.to_dict(), sort_keys=True), 1,
             self._session)))
        component.version = 1
        self._notify_watchers()

    def update_component(self, component):
        data = json.dumps(component.to_dict(), sort_keys=True)

        def fn(conn):
            cur = conn.execute("UPDATE components SET data=?, version=version+1 WHERE id=?",
                               (data, component.id))
            if cur.rowcount == 0:
                raise NotFoundError(f"component {component.id} is not registered")
        self._tx(fn)
        self._components[component.id] = component
        self._notify_watchers()
        return component

    def unregister_component(self, component):
        self._components.pop(component.id, None)
        self._tx(lambda conn: conn.execute("DELETE FROM components WHERE id=?", (component.id,)))
        self._notify_watchers()

    def list_components(self, kind=None):
        if kind is None:
            rows = self._read("SELECT id, kind, data, version, session FROM components")
        else:
            rows = self._read("SELECT id, kind, data, version, session FROM components "
                              "WHERE kind=?", (kind,))
        live, _ = self._live_sessions()
        out = []
        for cid, ckind, data, version, session in sorted(rows):
            if session not in live:
                continue
            comp = Component.from_dict(json.loads(data), id=cid, version=version)
            comp.kind = ckind
            out.append(comp)
        return out
