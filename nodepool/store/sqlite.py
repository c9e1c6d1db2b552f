"""The embedded state store: one SQLite file (WAL) shared by every process on one host.

It behaves like the ZooKeeper store so the daemons cannot tell them apart:

* Each store object owns a *session* row with its PID, the process start time (so a reused PID
  is not mistaken for a live one) and a heartbeat *counter* (``beats``) it increments every
  ``session_timeout/3``.  A session is dead when, on this host, its process is gone, or when
  the observer watched its counter stand still for ``session_timeout`` on the observer's own
  monotonic clock.  The wall clock plays no part: a clock step (NTP, a resumed VM) cannot make
  one process reap every other session.  A dead session's locks, ephemeral requests and
  component registrations are removed by whichever process notices first (every store looks
  for dead sessions each second; lock acquisition treats a dead holder's lock as free at once).
  A ``kill -9``'d launcher therefore loses its locks within about a second, not a session
  timeout.  (``heartbeat`` still records the wall time of the last beat, for operators.)
* If our own session was expired (we were frozen longer than ``session_timeout``), listeners
  hear ``"lost"``, a new session is opened, our components are registered again, ``"connected"``.
* Locks are rows keyed by Nodepool's lock paths.
* ``watch()`` wakes on any process's commit: every commit sends a datagram to each watching
  process (``wakeups``), whose watcher thread then reads ``PRAGMA data_version``; it also
  looks every ``SAFETY_POLL`` seconds (every ``poll_interval`` where wake-ups cannot work).
* ``list_nodes``/``list_requests`` keep parsed records in memory and reread only rows whose
  change counter moved, so a launcher with 10,000 nodes does not reparse them every loop.
"""
import json
import logging
import os
import select
import socket
import sqlite3
import threading
import time
import uuid
import weakref

from ..errors import ConflictError, LockError, NotFoundError, SessionLostError, StoreError
from ..model.records import Component, ImageBuild, ImageUpload, Node, NodeRequest
from .base import ChangeWatcher, Lock, StateStore, node_lock_path
from .cached import CachedRecord, ChangeLog
from .wakeups import Wakeups
from .zk import paths as P

log = logging.getLogger("nodepool.store.sqlite")

SAFETY_POLL = 0.25      # seconds between looks for a commit nobody woke us for

_IN_PROCESS = {}        # database path -> started stores of this process (told of commits directly)
TOMBSTONES_KEPT = 100000   # generations of deleted-row ids kept for readers' caches

COMPONENT_KINDS = ("launcher", "builder", "pool")

SESSION_COLUMNS = "id, pid, pstart, hostname, heartbeat, beats"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, pid INTEGER, pstart TEXT, hostname TEXT, heartbeat REAL,
    beats INTEGER NOT NULL DEFAULT 0);
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
CREATE TABLE IF NOT EXISTS tombstones (tbl TEXT NOT NULL, id TEXT NOT NULL, gen INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS tombstones_gen ON tombstones(tbl, gen);
CREATE TABLE IF NOT EXISTS components (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, data TEXT NOT NULL, version INTEGER NOT NULL,
    session TEXT NOT NULL);
"""


def _process_start(pid):
    """The kernel's start time of ``pid`` (guards against PID reuse), or None if it is gone.

    A zombie (killed, not yet reaped by its parent) counts as gone: it holds nothing any more.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] in ("Z", "X", "x"):
        return None
    return fields[19]


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def session_beating(seen, seen_lock, sid, beats, now, timeout):
    """Whether session ``sid`` (counter ``beats``, read at ``now`` on the observer's monotonic
    clock) still beats: its counter moved since we last looked, or has stood still for at most
    ``timeout`` of our own time.  ``seen`` keeps, per session, the counter and when we saw it
    move; a session seen for the first time gets a full ``timeout`` from now."""
    with seen_lock:
        last = seen.get(sid)
        if last is None or last[0] != beats:
            seen[sid] = (beats, now)
            return True
        return now - last[1] <= timeout


class SQLiteStore(StateStore):
    """The embedded store (see the module docstring).

    ``busy_timeout`` is how long a write waits for another process's transaction before giving
    up with a StoreError; transactions here last microseconds, so only a stuck process hits it.
    ``clock`` is the monotonic clock on which other sessions' silence is measured (tests pass a
    fake one).
    """

    def __init__(self, path, session_timeout=10.0, hostname=None, poll_interval=0.005,
                 busy_timeout=5.0, clock=time.monotonic):
        self.path = os.path.abspath(str(path))
        self.session_timeout = float(session_timeout)
        self.hostname = hostname or socket.gethostname()
        self.poll_interval = poll_interval
        self.busy_timeout = float(busy_timeout)
        self._clock = clock
        self._seen = {}                 # session id -> (beats, our clock when beats last moved)
        self._seen_lock = threading.Lock()
        self._local = threading.local()
        self._connections = []
        self._conn_lock = threading.Lock()
        self._session = None
        self._pid = os.getpid()
        self._pstart = _process_start(self._pid)
        self._stop = threading.Event()
        self._threads = []
        self._watchers = weakref.WeakSet()
        self._watch_lock = threading.Lock()
        self._poller = None
        self._components = {}           # id -> Component we registered
        self._components_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._caches = {"nodes": {}, "requests": {}}     # table -> {id: CachedRecord}
        self._ordered = {"nodes": [], "requests": []}    # table -> [CachedRecord] in listing order
        self._changes = {"nodes": ChangeLog(), "requests": ChangeLog()}
        self._gens = {"nodes": -1, "requests": -1}   # -1: nothing read yet
        self._wakeups = Wakeups(self.path)
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
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout,
                                   isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA synchronous=NORMAL")
            return conn
        except sqlite3.Error as exc:
            raise self._error(exc) from None

    def _error(self, exc):
        """One line naming the file and the problem, in place of a raw sqlite3 error."""
        if isinstance(exc, StoreError):
            return exc
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        low = text.lower()
        if "not a database" in low or "malformed" in low or "encrypted" in low:
            return StoreError(f"state store {self.path} is not a usable SQLite database "
                              f"(corrupt or another kind of file): {text}")
        if "locked" in low or "busy" in low:
            return StoreError(f"state store {self.path} is locked by another process "
                              f"(waited {self.busy_timeout:g}s): {text}")
        if "unable to open" in low or "readonly" in low or "read-only" in low:
            return StoreError(f"cannot open state store {self.path} for writing: {text} "
                              f"(check the path and its permissions)")
        return StoreError(f"state store {self.path}: {text}")

    def _tx(self, fn, immediate=True, wake=True):
        """Run ``fn(conn)`` in one transaction; SQLite errors become one-line StoreErrors.
        A commit that changed rows wakes every watcher of the file, in this process and others
        (``wake=False``: nobody, for heartbeats)."""
        conn = self._conn()
        try:
            changes = conn.total_changes
            conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                result = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            if wake and conn.total_changes != changes:     # only commits that changed rows
                self._wakeups.poke()          # other processes' watchers
                for store in list(_IN_PROCESS.get(self.path, ())):
                    store._notify_watchers()  # this process's, every store object of the file
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

    def _close_connections(self):
        with self._conn_lock:
            for conn in self._connections:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._connections.clear()
        self._local = threading.local()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self):
        if self._started:
            return self
        self._check_path()
        try:
            self._init_schema()
            self._open_session()
        except BaseException:
            self._close_connections()
            raise
        self._stop.clear()
        self._started = True
        _IN_PROCESS.setdefault(self.path, weakref.WeakSet()).add(self)
        hb = threading.Thread(target=self._heartbeat_loop, name="store-heartbeat", daemon=True)
        hb.start()
        self._threads = [hb]
        with self._watch_lock:
            if len(self._watchers):
                self._start_poller()
        return self

    def _check_path(self):
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the directory of state store {self.path}: "
                             f"{exc.strerror}") from None
        if os.path.isdir(self.path):
            raise StoreError(f"state store {self.path} is a directory, not a database file")
        if os.path.exists(self.path) and not os.access(self.path, os.R_OK | os.W_OK):
            raise StoreError(f"cannot open state store {self.path}: permission denied")

    def _init_schema(self):
        """Switch to WAL and create the tables.  Several processes may do this at once on a
        new file; SQLite answers some of those races with an immediate "locked" that the busy
        handler does not cover, so those are retried until the busy timeout."""
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                return self._init_schema_once()
            except sqlite3.OperationalError as exc:
                text = str(exc).lower()
                if ("locked" not in text and "busy" not in text) or time.monotonic() > deadline:
                    raise self._error(exc) from None
                time.sleep(0.01)
            except sqlite3.Error as exc:
                raise self._error(exc) from None

    def _init_schema_once(self):
        conn = self._conn()
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        # Read first: on a file that is not a database this fails before anything is written.
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if mode.lower() != "wal":
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                log.warning("state store %s: journal mode is %s, not WAL", self.path, mode)
        have = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table'").fetchall()}
        if not {"meta", "sessions", "nodes", "requests", "locks", "builds", "uploads",
                "upload_seq", "image_flags", "components"} <= have:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        columns = {r[1] for r in conn.execute("PRAGMA table_info(sessions)").fetchall()}
        if "beats" not in columns:      # a file made before sessions had a beat counter
            conn.execute("BEGIN IMMEDIATE")
            try:
                columns = {r[1] for r in conn.execute("PRAGMA table_info(sessions)")}
                if "beats" not in columns:
                    conn.execute("ALTER TABLE sessions ADD COLUMN beats INTEGER NOT NULL "
                                 "DEFAULT 0")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _open_session(self):
        sid = f"{self.hostname}-{self._pid}-{uuid.uuid4().hex[:12]}"

        def fn(conn):
            conn.execute(f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES (?,?,?,?,?,0)",
                         (sid, self._pid, self._pstart, self.hostname, time.time()))
            self._reap(conn)
        self._tx(fn)
        self._session = sid

    def stop(self):
        if not self._started:
            return
        self._started = False
        _IN_PROCESS.get(self.path, set()).discard(self)
        self._stop.set()
        self._wakeups.wake_self()      # our watcher thread returns at once
        for t in self._threads + [self._poller]:
            if t is not None and t is not threading.current_thread():
                t.join(5)
        self._threads = []
        self._poller = None
        sid = self._session
        try:
            self._tx(lambda conn: self._drop_session(conn, sid))
        except StoreError as exc:
            log.warning("could not remove our session from %s: %s", self.path, exc)
        self._notify_watchers()        # no longer told by commits: we left _IN_PROCESS
        self._close_connections()
        self._wakeups.stop()

    @property
    def session_id(self):
        return self._session

    def _drop_session(self, conn, sid):
        gone = [r[0] for r in conn.execute("DELETE FROM requests WHERE session=? RETURNING id",
                                           (sid,))]
        if gone:
            self._deleted(conn, "requests", gone)
        conn.execute("DELETE FROM locks WHERE session=?", (sid,))
        conn.execute("DELETE FROM components WHERE session=?", (sid,))
        conn.execute("DELETE FROM sessions WHERE id=?", (sid,))

    def _alive(self, row, now):
        """Whether a session row (``SESSION_COLUMNS``) is live: on this host a running process
        that is the same one (start time) that opened it, and a beat counter we have not
        watched stand still for ``session_timeout`` (``now`` is our monotonic clock)."""
        sid, pid, pstart, hostname, _heartbeat, beats = row
        if sid == self._session:
            return True
        if hostname == self.hostname and not self._process_alive(sid, pid, pstart):
            return False
        return session_beating(self._seen, self._seen_lock, sid, beats, now,
                               self.session_timeout)

    def _process_alive(self, sid, pid, pstart):
        """Whether the process (of this host) that opened session ``sid`` still runs."""
        if pid == self._pid:
            return pstart == self._pstart or sid == self._session
        if not _pid_alive(pid):
            return False
        started = _process_start(pid)
        return not (started is None or (pstart is not None and started != pstart))

    def _live_sessions(self, conn=None):
        rows = (conn or self._conn()).execute(f"SELECT {SESSION_COLUMNS} FROM sessions") \
            .fetchall()
        now = self._clock()
        every = {row[0] for row in rows}
        with self._seen_lock:
            for sid in [sid for sid in self._seen if sid not in every]:
                del self._seen[sid]
        return {row[0] for row in rows if self._alive(row, now)}, every

    def _reap(self, conn):
        live, every = self._live_sessions(conn)
        for sid in every - live:
            log.info("state store %s: session %s is gone; removing its locks, ephemeral "
                     "requests and components", self.path, sid)
            self._drop_session(conn, sid)
        return every - live

    def _heartbeat_loop(self):
        """Beat every ``session_timeout/3``; between beats look (read only, cheap) for dead
        sessions of this host every second, so a killed process's locks go quickly."""
        beat_every = max(0.2, self.session_timeout / 3)
        check_every = min(1.0, beat_every)
        next_beat = time.monotonic() + beat_every
        while not self._stop.wait(check_every):
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + beat_every
                    lost = self._tx(self._beat, wake=False)
                else:
                    lost = False
                    live, every = self._live_sessions()
                    if self._session not in every:
                        lost = True
                    elif every - live:
                        self._tx(self._reap)
            except StoreError as exc:
                log.warning("state store heartbeat failed: %s", exc)
                continue
            if lost and not self._stop.is_set():
                try:
                    self._recover_session()
                except StoreError as exc:
                    log.warning("state store %s: could not open a new session: %s",
                                self.path, exc)

    def _beat(self, conn):
        cur = conn.execute("UPDATE sessions SET heartbeat=?, beats=beats+1 WHERE id=?",
                           (time.time(), self._session))
        if cur.rowcount == 0:
            return True
        self._reap(conn)
        return False

    def _recover_session(self):
        log.error("state store %s: session %s was expired by another process (were we frozen?); "
                  "our locks and ephemeral requests are gone", self.path, self._session)
        self._notify_session("lost")
        self._open_session()
        with self._components_lock:
            components = list(self._components.values())
        for comp in components:
            self._insert_component(comp)
        self._notify_session("connected")
        self._notify_watchers()

    # -- change notification ----------------------------------------------------------------------

    def watch(self):
        watcher = ChangeWatcher()
        with self._watch_lock:
            self._watchers.add(watcher)
            if self._started:
                self._start_poller()
        return watcher

    def _start_poller(self):
        """Called with ``_watch_lock`` held.  The wake-up socket is bound and the baseline
        ``data_version`` read here, before ``watch()`` returns, so a commit right after it is
        never missed."""
        if self._poller is not None and self._poller.is_alive():
            return
        sock = self._wakeups.listen()
        try:
            conn = self._connect()
            baseline = conn.execute("PRAGMA data_version").fetchone()[0]
        except (StoreError, sqlite3.Error) as exc:
            log.warning("state store %s: change poller cannot start: %s", self.path, exc)
            self._wakeups.close()
            self._poller = None
            return
        self._poller = threading.Thread(target=self._poll_loop, args=(conn, baseline, sock),
                                        name="store-watch", daemon=True)
        self._poller.start()

    def _poll_loop(self, conn, last, sock):
        """Notify watchers whenever any connection commits (``PRAGMA data_version`` moves):
        looked at when a committer wakes us (``wakeups``), and every ``SAFETY_POLL`` anyway
        (every ``poll_interval`` without wake-ups); ends when the store stops or no watcher is
        left."""
        try:
            while not self._stop.is_set():
                if sock is not None:
                    if select.select([sock], [], [], SAFETY_POLL)[0]:
                        self._wakeups.drain(sock)
                elif self._stop.wait(self.poll_interval):
                    return
                with self._watch_lock:
                    if not len(self._watchers):
                        self._poller = None
                        return
                try:
                    version = conn.execute("PRAGMA data_version").fetchone()[0]
                except sqlite3.Error:
                    self._stop.wait(0.5)
                    continue
                if version != last:
                    last = version
                    self._notify_watchers()
        finally:
            conn.close()
            if sock is not None:
                self._wakeups.close(sock)

    def _notify_watchers(self):
        with self._watch_lock:
            watchers = list(self._watchers)
        for w in watchers:
            w.notify()

    # -- generic record helpers --------------------------------------------------------------------

    def _bump(self, conn, table):
        return self._next(conn, f"gen:{table}")

    def _deleted(self, conn, table, ids):
        """Record deleted rows as tombstones at a new generation, so readers drop them from
        their caches without listing every id.  Tombstones older than ``TOMBSTONES_KEPT``
        generations go (every so often); a reader further behind lists the ids once."""
        gen = self._bump(conn, table)
        conn.executemany("INSERT INTO tombstones VALUES (?, ?, ?)",
                         [(table, i, gen) for i in ids])
        row = conn.execute("SELECT value FROM meta WHERE key=?",
                           (f"tombfloor:{table}",)).fetchone()
        if gen - (row[0] if row else 0) > 2 * TOMBSTONES_KEPT:
            floor = gen - TOMBSTONES_KEPT
            conn.execute("DELETE FROM tombstones WHERE tbl=? AND gen<?", (table, floor))
            conn.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                         "value=excluded.value", (f"tombfloor:{table}", floor))
        return gen

    def _next(self, conn, key):
        """Advance and return a counter; counters only grow, so ids are never reused."""
        conn.execute("INSERT INTO meta VALUES (?, 1) ON CONFLICT(key) DO UPDATE SET "
                     "value = value + 1", (key,))
        return conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0]

    def _check_session(self):
        if not self._started or self._session is None:
            raise SessionLostError(f"state store {self.path} is not started")

    def _write_record(self, table, what, record, check_version):
        record.version = self._tx(self._writer(table, what, record, check_version))
        return record

    def _writer(self, table, what, record, check_version):
        """The write of one record inside a transaction: returns its new version."""
        data = json.dumps(record.to_dict())

        def fn(conn):
            row = conn.execute(f"SELECT version FROM {table} WHERE id=?", (record.id,)).fetchone()
            if row is None:
                raise NotFoundError(f"{what} {record.id} does not exist (any more)")
            if check_version and record.version is not None and row[0] != record.version:
                raise ConflictError(f"{what} {record.id} changed since version "
                                    f"{record.version} (now {row[0]})")
            gen = self._bump(conn, table)
            conn.execute(f"UPDATE {table} SET data=?, version=?, gen=? WHERE id=?",
                         (data, row[0] + 1, gen, record.id))
            return row[0] + 1
        return fn

    def update_together(self, nodes=(), requests=(), release=(), delete_requests=()):
        records = [(n, self._writer("nodes", "node", n, True)) for n in nodes] + \
                  [(r, self._writer("requests", "request", r, True)) for r in requests]
        releasing = [lock for lock in release if not lock.released]

        def fn(conn):
            versions = [write(conn) for _, write in records]
            conn.executemany("DELETE FROM locks WHERE path=? AND session=?",
                             [(lock.path, lock.token) for lock in releasing])
            for request_id in delete_requests:
                self._delete_request_row(conn, request_id)
            return versions
        versions = self._tx(fn)
        for (record, _), version in zip(records, versions):
            record.version = version
        for lock in releasing:
            lock.released = True

    def _refresh(self, table, cls):
        """Bring the cache of ``table`` up to date (under ``_cache_lock``): only rows written
        since the last look (``gen`` is a per-table counter every write advances) are read and
        parsed again; the ids are listed only when a row went.  Changes go to the table's
        ``ChangeLog``."""
        rows = self._read("SELECT value FROM meta WHERE key=?", (f"gen:{table}",))
        gen = rows[0][0] if rows else 0
        if gen == self._gens[table]:
            return
        cache = self._caches[table]
        changes = self._changes[table]
        for rid, data, version, g in self._read(
                f"SELECT id, data, version, gen FROM {table} WHERE gen > ?",
                (self._gens[table],)):
            cache[rid] = CachedRecord(cls.from_dict(json.loads(data), id=rid, version=version), g)
            changes.note(rid)
        last = self._gens[table]
        if last >= 0:
            floor = self._read("SELECT value FROM meta WHERE key=?", (f"tombfloor:{table}",))
            if not floor or last >= floor[0][0]:
                for (rid,) in self._read("SELECT id FROM tombstones WHERE tbl=? AND gen>?",
                                         (table, last)):
                    if cache.pop(rid, None) is not None:
                        changes.note(rid)
        # rows deleted without a tombstone (too long ago, an older writer): list the ids
        count = self._read(f"SELECT count(*) FROM {table}")[0][0]
        if count != len(cache):
            present = {r[0] for r in self._read(f"SELECT id FROM {table}")}
            for rid in [rid for rid in cache if rid not in present]:
                del cache[rid]
                changes.note(rid)
        if self._gens[table] == -1:
            changes.reset()
        self._ordered[table] = None
        self._gens[table] = gen

    def _cached_list(self, table, cls, order, shared=False):
        """All records of ``table`` in ``order``, as fresh objects (or, with ``shared``, the
        cache's own objects, which the caller must not change); sorted again only after a
        change."""
        with self._cache_lock:
            self._refresh(table, cls)
            ordered = self._ordered[table]
            if ordered is None:
                ordered = self._ordered[table] = sorted(self._caches[table].values(),
                                                        key=lambda c: order(c.record))
        if shared:
            return [c.record for c in ordered]
        return [c.fresh() for c in ordered]

    def node_changes(self, since):
        return self._table_changes("nodes", Node, since)

    def request_changes(self, since):
        return self._table_changes("requests", NodeRequest, since)

    def _table_changes(self, table, cls, since):
        with self._cache_lock:
            self._refresh(table, cls)
            position, ids = self._changes[table].since(since)
            if ids is None:
                return position, None
            cache = self._caches[table]
            return position, {rid: (cache[rid].record if rid in cache else None) for rid in ids}

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
        return node

    def get_node(self, node_id):
        rows = self._read("SELECT data, version FROM nodes WHERE id=?", (str(node_id),))
        if not rows:
            return None
        return Node.from_dict(json.loads(rows[0][0]), id=str(node_id), version=rows[0][1])

    def list_nodes(self, shared=False):
        return self._cached_list("nodes", Node, lambda n: n.id, shared)

    def update_node(self, node, check_version=False):
        return self._write_record("nodes", "node", node, check_version)

    def delete_node(self, node_id):
        def fn(conn):
            if conn.execute("DELETE FROM nodes WHERE id=?", (str(node_id),)).rowcount:
                self._deleted(conn, "nodes", [str(node_id)])
            conn.execute("DELETE FROM locks WHERE path=?", (node_lock_path(node_id),))
        self._tx(fn)

    # -- requests ----------------------------------------------------------------------------------

    def submit_request(self, request, priority="100", ephemeral=True):
        self._check_session()
        priority = str(priority)
        if len(priority) != 3 or not priority.isdigit():
            raise ValueError(f"request priority must be 3 digits, not {priority!r}")
        now = time.time()
        request.created_time = request.created_time or now
        request.state_time = request.state_time or now
        if not request.event_id:
            request.event_id = uuid.uuid4().hex

        def fn(conn):
            seq = self._next(conn, "seq:request")
            request.id = f"{priority}-{seq:010d}"
            gen = self._bump(conn, "requests")
            conn.execute("INSERT INTO requests VALUES (?,?,?,?,?)",
                         (request.id, json.dumps(request.to_dict()), 1, gen,
                          self._session if ephemeral else None))
        self._tx(fn)
        request.version = 1
        return request

    def get_request(self, request_id):
        rows = self._read("SELECT data, version FROM requests WHERE id=?", (request_id,))
        if not rows:
            return None
        return NodeRequest.from_dict(json.loads(rows[0][0]), id=request_id, version=rows[0][1])

    def list_requests(self, shared=False):
        return self._cached_list("requests", NodeRequest, NodeRequest.sort_key, shared)

    def update_request(self, request, check_version=False):
        return self._write_record("requests", "request", request, check_version)

    def delete_request(self, request_id):
        self._tx(lambda conn: self._delete_request_row(conn, request_id))

    def _delete_request_row(self, conn, request_id):
        if conn.execute("DELETE FROM requests WHERE id=?", (request_id,)).rowcount:
            self._deleted(conn, "requests", [request_id])

    # -- locks -------------------------------------------------------------------------------------

    def lock(self, path, blocking=False, timeout=None, identifier=None):
        self._check_session()
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while True:
            sid = self._try_lock(path, identifier)
            if sid:
                return Lock(self, path, sid)
            if not blocking or (deadline is not None and time.monotonic() >= deadline):
                raise LockError(f"lock {path} is held by another process")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _try_lock(self, path, identifier):
        sid = self._session
        return self._tx(lambda conn: self._take_lock(conn, path, identifier, sid))

    def _take_lock(self, conn, path, identifier, sid):
        """Inside a transaction: take the lock for session ``sid`` (returned) unless a live
        session holds it (False); LockError if ``sid`` holds it already."""
        row = conn.execute("SELECT session FROM locks WHERE path=?", (path,)).fetchone()
        if row is not None:
            if row[0] == sid:
                raise LockError(f"lock {path} is already held by this session "
                                f"(locks are not re-entrant)")
            srow = conn.execute(f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id=?",
                                (row[0],)).fetchone()
            if srow is not None and self._alive(srow, self._clock()):
                return False
            conn.execute("DELETE FROM locks WHERE path=?", (path,))
        conn.execute("INSERT INTO locks VALUES (?,?,?,?)", (path, sid, identifier, time.time()))
        return sid

    def try_locks(self, paths, identifier=None):
        """One transaction for all of them."""
        self._check_session()
        sid = self._session

        def fn(conn):
            taken = []
            for path in paths:
                try:
                    taken.append(self._take_lock(conn, path, identifier, sid))
                except LockError:
                    taken.append(False)
            return taken
        return [Lock(self, path, sid) if got else None for path, got in zip(paths, self._tx(fn))]

    def _release(self, lock):
        try:
            self._tx(lambda conn: conn.execute(
                "DELETE FROM locks WHERE path=? AND session=?", (lock.path, lock.token)))
        except StoreError as exc:
            log.warning("releasing %s failed: %s", lock.path, exc)
            self._notify_watchers()

    def holds(self, lock):
        return not lock.released and lock.token == self._session

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
        return self._locked_ids(f"{P.NODE_ROOT}/", "/lock")

    def locked_request_ids(self):
        return self._locked_ids(f"{P.REQUEST_LOCK_ROOT}/")

    # -- images ------------------------------------------------------------------------------------

    def create_build(self, build):
        if not build.image:
            raise ValueError("an image build needs build.image set")
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
        return build

    def delete_build(self, image, build_id):
        def fn(conn):
            conn.execute("DELETE FROM uploads WHERE image=? AND build_id=?", (image, build_id))
            conn.execute("DELETE FROM upload_seq WHERE image=? AND build_id=?", (image, build_id))
            conn.execute("DELETE FROM builds WHERE image=? AND id=?", (image, build_id))
        self._tx(fn)

    def create_upload(self, upload):
        return self._insert_upload(upload, restore=False)

    def restore_upload(self, upload):
        return self._insert_upload(upload, restore=True)

    def _insert_upload(self, upload, restore):
        """A new upload numbered by the (build, provider) sequence, or, restoring, under its
        own id with the sequence raised to it."""
        upload.state_time = upload.state_time or time.time()

        def fn(conn):
            key = (upload.image, upload.build_id, upload.provider)
            if conn.execute("SELECT 1 FROM builds WHERE image=? AND id=?",
                            key[:2]).fetchone() is None:
                raise NotFoundError(f"build {upload.build_id} of image {upload.image} "
                                    f"does not exist")
            if restore:
                conn.execute("INSERT INTO upload_seq VALUES (?,?,?,?) ON CONFLICT DO UPDATE "
                             "SET seq = max(seq, excluded.seq)", (*key, int(upload.id)))
            else:
                conn.execute("INSERT INTO upload_seq VALUES (?,?,?,1) ON CONFLICT DO UPDATE "
                             "SET seq = seq + 1", key)
                seq = conn.execute("SELECT seq FROM upload_seq WHERE image=? AND build_id=? "
                                   "AND provider=?", key).fetchone()[0]
                upload.id = f"{seq:010d}"
            order = self._next(conn, "seq:upload")
            try:
                conn.execute("INSERT INTO uploads VALUES (?,?,?,?,?,?,?)",
                             (*key, upload.id, json.dumps(upload.to_dict()), 1, order))
            except sqlite3.IntegrityError:
                raise ConflictError(f"upload {upload.id} of {upload.image} build "
                                    f"{upload.build_id} on {upload.provider} already exists") \
                    from None
        self._tx(fn)
        upload.version = 1
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
        return upload

    def delete_upload(self, image, build_id, provider, upload_id):
        self._tx(lambda conn: conn.execute(
            "DELETE FROM uploads WHERE image=? AND build_id=? AND provider=? AND id=?",
            (image, build_id, provider, upload_id)))

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
        if component.kind not in COMPONENT_KINDS:
            raise StoreError(f"component kind {component.kind!r} is not one of "
                             f"{', '.join(COMPONENT_KINDS)}")
        component.hostname = component.hostname or self.hostname

        def fn(conn):
            seq = self._next(conn, "seq:component")
            component.id = f"{component.hostname}{seq:010d}"
        self._tx(fn)
        self._insert_component(component)
        with self._components_lock:
            self._components[component.id] = component
        return component

    def _insert_component(self, component):
        self._tx(lambda conn: conn.execute(
            "INSERT OR REPLACE INTO components VALUES (?,?,?,?,?)",
            (component.id, component.kind, json.dumps(component.to_dict(), sort_keys=True), 1,
             self._session)))
        component.version = 1

    def update_component(self, component):
        data = json.dumps(component.to_dict(), sort_keys=True)

        def fn(conn):
            cur = conn.execute("UPDATE components SET data=?, version=version+1 WHERE id=?",
                               (data, component.id))
            if cur.rowcount == 0:
                raise NotFoundError(f"component {component.kind}/{component.id} is not "
                                    f"registered")
            return conn.execute("SELECT version FROM components WHERE id=?",
                                (component.id,)).fetchone()[0]
        try:
            component.version = self._tx(fn)
        except NotFoundError:
            with self._components_lock:
                registered = component.id in self._components
            if not registered:
                raise
            self._insert_component(component)   # our session was replaced meanwhile
            return component
        return component

    def unregister_component(self, component):
        with self._components_lock:
            self._components.pop(component.id, None)
        self._tx(lambda conn: conn.execute("DELETE FROM components WHERE id=?", (component.id,)))

    def list_components(self, kind=None):
        if kind is None:
            rows = self._read("SELECT id, kind, data, version, session FROM components")
        else:
            rows = self._read("SELECT id, kind, data, version, session FROM components "
                              "WHERE kind=?", (kind,))
        live, _ = self._live_sessions()
        out = []
        for cid, ckind, data, version, session in sorted(rows, key=lambda r: (r[1], r[0])):
            if session not in live:
                continue
            comp = Component.from_dict(json.loads(data), id=cid, version=version)
            comp.kind = ckind
            out.append(comp)
        return out
