"""The ZooKeeper state store: Nodepool 11's layout and JSON, so Zuul and Nodepool interoperate.

Nodes and requests are served from in-memory caches fed by one persistent recursive watch on
``/nodepool`` (each event fetches only the changed znode); everything else is read on demand.
The caches start on first use (a client that only submits and waits on its own request never
reads every node), and events of our own writes fetch nothing: the write already updated the
cache.  Component listings are kept until the watch reports a change below ``components``.
Locks are kazoo ``Lock`` recipes at Nodepool's paths.  Calls never wait longer than the session
timeout for a ZooKeeper answer: a suspended connection raises ``StoreError`` rather than hang or
pretend a write succeeded.
"""
import json
import logging
import os
import queue
import socket
import ssl
import sys
import threading
import time
import uuid

from kazoo import exceptions as kze
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import EventType, KazooState
from kazoo.recipe.lock import Lock as KazooLock

from nodepool.errors import (ConflictError, LockError, NotFoundError, SessionLostError,
                             StoreError)
from nodepool.model.records import Component, ImageBuild, ImageUpload, Node, NodeRequest
from nodepool.model.states import NodeState

from ..gcpause import collector_paused
from .base import ChangeWatcher, Lock, StateStore
from .cached import CachedRecord, ChangeLog, fresh_copy
from .zk import paths as P
from .zk.handler import PollThreadingHandler
from .zk.multiread import multi_read_async
from .zk.recursive_watch import RecursiveWatchClient

EVENT_BATCH = 500        # watch events applied per batch (their fetches read together)
MULTI_READ_BATCH = 200   # reads per multiRead request (records of a few KB: answers < 1 MB)

log = logging.getLogger("nodepool.store.zookeeper")
# a session-loop event: delete the contenders of locks released during an outage
_STALE_CONTENDERS = object()


def _encode(record, sort_keys=False):
    return json.dumps(record.to_dict(), sort_keys=sort_keys).encode("utf-8")


_SCAN_JSON = json.JSONDecoder().scan_once     # one JSON value at an offset (json's C scanner)


def _decode(data, what):
    """JSON object from znode data; None when empty or not a JSON object (logged)."""
    if not data:
        return None
    try:
        # the common case without ``json.loads``' per-call work (ten thousand nodes): exactly
        # one JSON object spanning the whole text; anything else takes the path below
        text = data.decode("utf-8")
        value, end = _SCAN_JSON(text, 0)
        if end == len(text) and type(value) is dict:
            return value
    except (StopIteration, ValueError):     # UnicodeDecodeError is a ValueError
        pass
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        log.warning("ignoring %s: not JSON (%s)", what, e)
        return None
    if not isinstance(value, dict):
        log.warning("ignoring %s: JSON is not an object", what)
        return None
    return value


def _check_tls_files(tls):
    """Fail early with one line naming the TLS file that is wrong; returns an SSL context."""
    ca, cert, key = tls
    for role, path in (("CA", ca), ("certificate", cert), ("key", key)):
        if not path or not os.path.isfile(path):
            raise StoreError(f"ZooKeeper TLS {role} file {path!r} does not exist")
        if not os.access(path, os.R_OK):
            raise StoreError(f"ZooKeeper TLS {role} file {path!r} is not readable")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    try:
        ctx.load_verify_locations(ca)
    except (ssl.SSLError, OSError) as e:
        raise StoreError(f"ZooKeeper TLS CA file {ca!r} is not a usable certificate: {e}")
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise StoreError(f"ZooKeeper TLS certificate {cert!r} / key {key!r} do not load: {e}")
    ctx.check_hostname = False
    return ctx


def _split_hosts(hosts):
    out = []
    for item in hosts.split(","):
        item = item.strip()
        if not item:
            continue
        host, _, port = item.rpartition(":")
        out.append((host or item, int(port) if port.isdigit() else 2181))
    return out


_TLS_HINTS = {
    "CERTIFICATE_VERIFY_FAILED": ": the server certificate is not signed by our CA file",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": ": the server does not trust our client certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": ": the server does not trust our client certificate",
    "UNEXPECTED_EOF_WHILE_READING": ": is this a plain (non-TLS) port?",
    "WRONG_VERSION_NUMBER": ": is this a plain (non-TLS) port?",
}


def _diagnose(hosts, ssl_ctx):
    """Why we cannot reach any server: one short phrase per host (best effort)."""
    reasons = []
    for host, port in _split_hosts(hosts):
        try:
            with socket.create_connection((host, port), timeout=3.0) as sock:
                if ssl_ctx is not None:
                    with ssl_ctx.wrap_socket(sock, server_hostname=host):
                        pass
            reasons.append(f"{host}:{port} accepts connections but no session was established")
        except ssl.SSLError as e:
            reasons.append(f"{host}:{port} TLS handshake failed ({e.reason or e}"
                           f"{_TLS_HINTS.get(e.reason, '')})")
        except OSError as e:
            reasons.append(f"{host}:{port} {e.strerror or e}")
    return "; ".join(reasons) or "no server given"


class _LockAttempt:
    """One lock being taken: its first attempt is sent before the answer is read."""

    __slots__ = ("path", "identifier", "recipe", "in_record", "generation", "tried", "created",
                 "error")

    def __init__(self, path, identifier, recipe, in_record, generation):
        self.path, self.identifier, self.recipe = path, identifier, recipe
        self.in_record, self.generation = in_record, generation
        self.tried = self.created = self.error = None


class _RequestWatcher(ChangeWatcher):
    """Woken by a one-shot ZooKeeper watch on one request znode (what Zuul does), re-armed by
    each ``wait``: the re-arm is sent before the caller's next read on the same session, and
    ZooKeeper handles a session's requests in order, so no change falls between them.  After a
    lost session the watch is gone; callers wait with a timeout and read again anyway."""

    def __init__(self, store, path):
        super().__init__()
        self._store = store
        self._path = path
        self._armed = False
        self._reads = False
        self._arm_lock = threading.Lock()
        self._arm()

    def _fired(self, event):
        with self._arm_lock:
            self._armed = False
        self.notify()

    def _arm(self):
        with self._arm_lock:
            if self._armed:
                return
            self._armed = True
        client = self._store._client
        try:
            if client is None:
                raise kze.ConnectionClosedError("store stopped")
            client.exists_async(self._path, watch=self._fired)
        except kze.KazooException:
            with self._arm_lock:
                self._armed = False

    def wait(self, timeout=None):
        fired = super().wait(timeout)
        if not self._reads:
            self._arm()
        return fired

    def read(self):
        """The request, read by a call that also sets the watch (one call instead of two).
        From the first ``read`` on, ``wait`` leaves re-arming to the next ``read``."""
        with self._arm_lock:
            self._reads = True
            self._armed = True
        store = self._store
        store._wait_connected()
        try:
            data, stat = store._wait(store._client.get_async(self._path, watch=self._fired),
                                     f"get {self._path}")
        except kze.NoNodeError:
            with self._arm_lock:
                self._armed = False     # no watch is set on a missing znode
            return None
        except BaseException:
            with self._arm_lock:
                self._armed = False
            raise
        return store._record_from("request", self._path.rsplit("/", 1)[1], data, stat)


def _ID_ORDER(cached):
    return cached.record.id


def _REQUEST_ORDER(cached):
    return cached.record.sort_key()


class _Cache:
    """Nodes and requests as last seen, with lock contenders; ``mzxid`` guards against going back."""

    def __init__(self):
        self.lock = threading.Lock()
        self.records = {"node": {}, "request": {}}       # id -> CachedRecord (tag: mzxid)
        self.ordered = {"node": None, "request": None}   # listing order, None when changed
        self.lockers = {"node": {}, "request": {}}       # id -> set of contender names
        self.changes = {"node": ChangeLog(), "request": ChangeLog()}

    def put(self, kind, record, mzxid):
        with self.lock:
            old = self.records[kind].get(record.id)
            if old is None or old.tag <= mzxid:
                self.records[kind][record.id] = CachedRecord(record, mzxid)
                self.ordered[kind] = None
                self.changes[kind].note(record.id)

    def drop(self, kind, record_id):
        with self.lock:
            if self.records[kind].pop(record_id, None) is not None:
                self.ordered[kind] = None
                self.changes[kind].note(record_id)
            if kind == "node":
                self.lockers["node"].pop(record_id, None)

    def add_locker(self, kind, record_id, name):
        with self.lock:
            self.lockers[kind].setdefault(record_id, set()).add(name)

    def remove_locker(self, kind, record_id, name):
        with self.lock:
            names = self.lockers[kind].get(record_id)
            if names is not None:
                names.discard(name)
                if not names:
                    del self.lockers[kind][record_id]

    def replace(self, kind, records, lockers):
        """Take a fresh walk, but keep a cached record newer than the walk's copy (a write of
        ours that landed while the walk was reading)."""
        with self.lock:
            old = self.records[kind]
            fresh = {}
            for record_id, (record, mzxid) in records.items():
                mine = old.get(record_id)
                fresh[record_id] = (mine if mine is not None and mine.tag > mzxid
                                    else CachedRecord(record, mzxid))
            self.records[kind] = fresh
            self.ordered[kind] = None
            self.lockers[kind] = lockers
            self.changes[kind].reset()

    def has(self, kind, record_id):
        with self.lock:
            return record_id in self.records[kind]

    def changed_since(self, kind, since):
        """``(position, {id: record or None})`` (see ``StateStore.node_changes``)."""
        with self.lock:
            position, ids = self.changes[kind].since(since)
            if ids is None:
                return position, None
            records = self.records[kind]
            return position, {rid: (records[rid].record if rid in records else None)
                              for rid in ids}

    def peek(self, kind, record_id):
        """The cached record itself (not to be changed), or None."""
        with self.lock:
            cached = self.records[kind].get(record_id)
        return None if cached is None else cached.record

    def contender_event(self, kind, record_id, name, created):
        """Apply one lock contender's create/delete straight from the event path (no read)."""
        with self.lock:
            if created:
                self.lockers[kind].setdefault(record_id, set()).add(name)
            else:
                names = self.lockers[kind].get(record_id)
                if names is not None:
                    names.discard(name)
                    if not names:
                        del self.lockers[kind][record_id]

    def clear_lockers(self, kind, record_id):
        with self.lock:
            self.lockers[kind].pop(record_id, None)

    def copies(self, kind, shared=False):
        """Copies of all records of ``kind`` in listing order (nodes by id, requests by
        priority); the order is worked out again only after a change.  ``shared``: the cached
        objects themselves (never changed in place: a change replaces them)."""
        with self.lock:
            ordered = self.ordered[kind]
            if ordered is None:
                key = _ID_ORDER if kind == "node" else _REQUEST_ORDER
                ordered = self.ordered[kind] = sorted(self.records[kind].values(), key=key)
        if shared:
            return [c.record for c in ordered]
        return [c.fresh() for c in ordered]

    def ids(self, kind):
        with self.lock:
            return set(self.records[kind])

    def locked_ids(self, kind):
        with self.lock:
            return {rid for rid, names in self.lockers[kind].items() if names}


class ZooKeeperStore(StateStore):
    """``StateStore`` on ZooKeeper (>= 3.6) with Nodepool 11's paths, JSON and lock recipe."""

    parallel_writes = True

    def __init__(self, hosts, chroot=None, tls=None, timeout=10.0):
        if isinstance(hosts, (list, tuple)):
            hosts = ",".join(hosts)
        self.hosts = hosts
        self.chroot = chroot.rstrip("/") if chroot and chroot != "/" else None
        self.tls = tuple(tls) if tls else None
        self.timeout = float(timeout)
        self._client = None
        self._ssl_ctx = None
        self._connected = threading.Event()
        self._stopping = False
        self._generation = 0          # bumped when a session is lost
        self._held = {}               # lock path -> Lock (ours, this session)
        self._held_lock = threading.Lock()
        self._components = {}         # id(component) -> component (re-registered on new session)
        self._components_lock = threading.Lock()
        self._register_lock = threading.RLock()    # creating a component after a session loss
        self._component_generation = {}          # id(component) -> session generation created
        self._watchers = []
        self._cache = _Cache()
        self._assured_lock_paths = set()     # lock parents known to exist
        self._events = queue.Queue()
        self._session_events = queue.Queue()
        self._threads = []
        self._watching = False        # the recursive watch is on (watch(), caches, components)
        self._caching = False         # node/request caches are maintained
        self._lazy_lock = threading.Lock()
        # path -> number of our own set_data calls whose CHANGED event has not been seen yet
        self._own_sets = {}
        self._own_sets_lock = threading.Lock()
        self._released_contenders = set()   # our released lock contenders, delete event pending
        # nodes we created whose lock directory does not exist yet: their first lock makes it
        # (one transaction) without first trying it
        self._new_nodes = set()
        self._components_gen = 0            # bumped by every component change we hear of
        self._components_cache = {}         # kind -> (gen, [Component])
        self._empty_nodes = set()           # node znodes seen with no record (remove_empty_nodes)
        self._lock_dir_mtimes = {}          # request lock dir -> mtime (remove_stale_request_locks)
        # (generation, contender path) of released locks whose delete failed on a broken
        # connection: if the session survives, the contender would hold the lock for good
        self._stale_contenders = []
        self._stale_lock = threading.Lock()

    @classmethod
    def from_config(cls, config):
        servers = list(config.zookeeper_servers or [])
        if not servers:
            raise StoreError("no zookeeper-servers configured")
        hosts = ",".join(f"{s.host}:{s.port}" for s in servers)
        chroot = next((s.chroot for s in servers if getattr(s, "chroot", None)), None)
        tls = None
        if config.zookeeper_tls is not None:
            t = config.zookeeper_tls
            tls = (t.ca, t.cert, t.key)
        return cls(hosts, chroot=chroot, tls=tls, timeout=config.zookeeper_timeout or 10.0)

    # -- lifecycle ---------------------------------------------------------------------------------

    def _describe(self):
        return f"{self.hosts}{self.chroot or ''}{' (TLS)' if self.tls else ''}"

    def start(self):
        if self._client is not None:
            return
        kwargs = {}
        if self.tls:
            self._ssl_ctx = _check_tls_files(self.tls)
            ca, cert, key = self.tls
            kwargs = dict(use_ssl=True, ca=ca, certfile=cert, keyfile=key, verify_certs=True)
        client = RecursiveWatchClient(hosts=self.hosts, timeout=self.timeout,
                                      connection_retry={"max_tries": -1, "max_delay": 2.0},
                                      handler=PollThreadingHandler(), **kwargs)
        try:
            client.start(timeout=self.timeout)
        except Exception as e:
            client.stop()
            client.close()
            raise StoreError(f"cannot connect to ZooKeeper at {self._describe()} within "
                             f"{self.timeout:g}s: {_diagnose(self.hosts, self._ssl_ctx)}") from e
        try:
            if self.chroot:
                client.ensure_path(self.chroot)
                client.chroot = self.chroot
            for path in (P.NODE_ROOT, P.REQUEST_ROOT, P.REQUEST_LOCK_ROOT, P.IMAGE_ROOT):
                client.ensure_path(path)
        except kze.KazooException as e:
            client.stop()
            client.close()
            raise StoreError(f"ZooKeeper at {self._describe()}: cannot create the "
                             f"/nodepool tree: {e!r}") from e
        self._client = client
        self._stopping = False
        self._watching = self._caching = False
        self._connected.set()
        client.add_listener(self._on_state)
        for target, name in ((self._event_loop, "zk-cache"), (self._session_loop, "zk-session")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _ensure_watch(self):
        """Start the recursive watch on first need (watch(), caches, component listing)."""
        if self._watching:
            return
        with self._lazy_lock:
            if self._watching:
                return
            self._wait_connected()
            self._add_watch()
            self._components_gen += 1
            self._watching = True

    def _ensure_caches(self):
        """Fill the node/request caches on first use.  The walk runs on the event thread, so it
        is ordered with the watch events: a change after the walk's read arrives after it."""
        if self._caching:
            return
        with self._lazy_lock:
            if self._caching:
                return
            if self._client is None:
                raise StoreError("ZooKeeper store is not started")
        self._ensure_watch()
        with self._lazy_lock:
            if self._caching:
                return
            done = threading.Event()
            self._events.put(("rewalk", done))
            if not done.wait(max(self.timeout, 30.0)):
                raise StoreError(f"ZooKeeper at {self._describe()}: the first read of nodes "
                                 f"and requests did not finish in time")
            if not self._caching:
                raise StoreError(f"ZooKeeper at {self._describe()}: the first read of nodes "
                                 f"and requests failed (see the log)")

    def stop(self):
        if self._client is None:
            return
        self._stopping = True
        with self._held_lock:
            held = list(self._held.values())
        with self._components_lock:
            components = list(self._components.values())
        if self._connected.is_set():
            # Tidy up explicitly while we can; otherwise closing the session removes them anyway.
            for lock in held:
                lock.release()
            for component in components:
                try:
                    self.unregister_component(component)
                except StoreError:
                    pass
        self._events.put(None)
        self._session_events.put(None)
        client, self._client = self._client, None
        try:
            client.remove_listener(self._on_state)
            client.stop()
            client.close()
        except Exception:  # closing a broken connection: nothing more to do
            pass
        for t in self._threads:
            t.join(timeout=self.timeout)
        self._threads = []
        self._connected.clear()

    @property
    def session_id(self):
        client = self._client
        if client is None or client.client_id is None:
            return None
        return f"{client.client_id[0]:x}"

    def watch(self):
        self._ensure_watch()
        w = ChangeWatcher()
        self._watchers.append(w)
        return w

    def watch_request(self, request_id):
        return _RequestWatcher(self, P.request_path(request_id))

    def read_request(self, request_id, watcher):
        if isinstance(watcher, _RequestWatcher) and watcher._store is self \
                and watcher._path == P.request_path(request_id):
            return watcher.read()
        return self.get_request(request_id)

    def _notify_watchers(self):
        for w in list(self._watchers):
            w.notify()

    # Our own writes go into the cache when their answer arrives, but ZooKeeper sends the watch
    # event of a write before its answer: the event may already have woken a loop that then read
    # the old record.  So every write-through wakes the watchers once more.

    def _put_own(self, kind, record, mzxid):
        self._cache.put(kind, fresh_copy(record), mzxid)
        self._notify_watchers()

    def _drop_own(self, kind, record_id):
        self._cache.drop(kind, record_id)
        self._notify_watchers()

    # -- session handling --------------------------------------------------------------------------

    def _on_state(self, state):
        """kazoo's listener (its connection thread): record the state, hand work to our thread."""
        if state == KazooState.CONNECTED:
            self._connected.set()
        else:
            self._connected.clear()
            if state == KazooState.LOST:
                self._generation += 1
        self._session_events.put(state)

    def _session_loop(self):
        lost = False
        while True:
            state = self._session_events.get()
            if state is None or self._stopping:
                return
            try:
                if state is _STALE_CONTENDERS:
                    if self._connected.is_set():
                        self._delete_stale_contenders()
                    continue
                if state == KazooState.LOST:
                    lost = True
                    with self._held_lock:
                        for lock in self._held.values():
                            lock.released = True
                        self._held.clear()
                    log.warning("ZooKeeper session lost (%s): locks and ephemerals are gone",
                                self._describe())
                    self._notify_session("lost")
                elif state == KazooState.SUSPENDED:
                    log.warning("ZooKeeper connection suspended (%s)", self._describe())
                elif state == KazooState.CONNECTED:
                    self._delete_stale_contenders()
                    if self._watching:
                        self._add_watch()
                    self._components_gen += 1
                    if lost:
                        self._reregister_components()
                    if self._caching:
                        self._events.put(("rewalk", None))
                    if lost:
                        lost = False
                        log.info("ZooKeeper session re-established (%s)", self._describe())
                        self._notify_session("connected")
            except StoreError as e:
                log.warning("ZooKeeper session handling: %s (retried on next reconnect)", e)

    def _add_watch(self):
        self._wait(self._client.add_recursive_watch(P.ROOT, self._on_watch_event),
                   f"addWatch {P.ROOT}")

    def _on_watch_event(self, event):
        if event.type != EventType.NONE and event.path:
            self._events.put((event.type, event.path))

    # Our own writes: ZooKeeper sends a session its watch events in zxid order.  Counting the
    # set_data calls we are about to make on a path (counted before sending), the first CHANGED
    # events of that path while the count is positive can skip the fetch: by the time all our
    # writes' events are seen, every foreign write's event came later and is fetched, and our
    # own writes put their result in the cache (``_Cache.put`` keeps the newest mzxid).  A write
    # that fails (no event) takes its count back and queues a re-read of the path.

    def _own_set_begin(self, path):
        with self._own_sets_lock:
            self._own_sets[path] = self._own_sets.get(path, 0) + 1

    def _own_set_failed(self, path):
        with self._own_sets_lock:
            left = self._own_sets.get(path, 0) - 1
            if left > 0:
                self._own_sets[path] = left
            else:
                self._own_sets.pop(path, None)
        self._events.put(("refetch", path))

    def _own_set_seen(self, path):
        """True when this CHANGED event may be ours (see above): consume one count."""
        with self._own_sets_lock:
            left = self._own_sets.get(path, 0)
            if left <= 0:
                return False
            if left == 1:
                del self._own_sets[path]
            else:
                self._own_sets[path] = left - 1
            return True

    def _wait_connected(self):
        if self._client is None:
            raise StoreError("ZooKeeper store is not started")
        if not self._connected.wait(self.timeout):
            raise StoreError(f"ZooKeeper connection to {self._describe()} is suspended "
                             f"(no reconnect within {self.timeout:g}s)")

    def _wait(self, async_result, what):
        """The answer of one ZooKeeper call, waiting at most the session timeout."""
        try:
            return async_result.get(timeout=self.timeout)
        except (kze.NoNodeError, kze.NodeExistsError, kze.BadVersionError, kze.NotEmptyError):
            raise
        except kze.SessionExpiredError as e:
            raise SessionLostError(f"ZooKeeper session expired during {what}") from e
        except (kze.ConnectionLoss, kze.ConnectionClosedError) as e:
            raise StoreError(f"ZooKeeper connection lost during {what}") from e
        except kze.KazooException as e:
            raise StoreError(f"ZooKeeper {what} failed: {e!r}") from e
        except KazooTimeoutError as e:
            raise StoreError(f"ZooKeeper did not answer {what} within {self.timeout:g}s") from e

    # thin wrappers: every call checks the connection first and has a deadline
    def _create(self, path, value=b"", ephemeral=False, sequence=False, makepath=True):
        self._wait_connected()
        return self._wait(self._client.create_async(path, value, ephemeral=ephemeral,
                                                    sequence=sequence, makepath=makepath,
                                                    include_data=True), f"create {path}")

    def _get(self, path):
        self._wait_connected()
        return self._wait(self._client.get_async(path), f"get {path}")

    def _get_or_none(self, path):
        try:
            return self._get(path)
        except kze.NoNodeError:
            return None, None

    def _set(self, path, value, version=-1):
        self._wait_connected()
        return self._wait(self._client.set_async(path, value, version), f"set {path}")

    def _exists(self, path):
        self._wait_connected()
        return self._wait(self._client.exists_async(path), f"exists {path}")

    def _children(self, path):
        self._wait_connected()
        try:
            return self._wait(self._client.get_children_async(path), f"get_children {path}")
        except kze.NoNodeError:
            return []

    def _delete(self, path, recursive=False):
        """Delete ``path`` (and, if ``recursive``, everything below); missing is fine."""
        self._wait_connected()
        for _ in range(10):
            try:
                if recursive:
                    for child in self._children(path):
                        self._delete(f"{path}/{child}", recursive=True)
                self._wait(self._client.delete_async(path), f"delete {path}")
                return
            except kze.NoNodeError:
                return
            except kze.NotEmptyError:
                if not recursive:
                    raise
        raise StoreError(f"ZooKeeper: cannot delete {path}: children keep appearing")

    # -- caches ------------------------------------------------------------------------------------

    def _event_loop(self):
        """Apply watch events to the caches.  The records they call for are fetched together
        at the end of each batch of queued events (one round trip, not one per event): every
        fetch is sent after the batch's events arrived, so it reads a state at least as new
        as theirs, and a record deleted meanwhile reads as missing."""
        while True:
            batch = [self._events.get()]
            while batch[-1] is not None and len(batch) < EVENT_BATCH:
                try:
                    batch.append(self._events.get_nowait())
                except queue.Empty:
                    break
            fetch = {}
            for item in batch:
                if item is None or self._stopping:
                    return
                try:
                    if item[0] == "rewalk":
                        self._fetch_many(fetch)
                        fetch = {}
                        try:
                            self._rewalk()
                            # switched on here, in order with the events: one queued after the
                            # walk's read must be applied, not skipped as "not caching yet"
                            self._caching = True
                        finally:
                            if item[1] is not None:
                                item[1].set()
                    elif item[0] == "barrier":
                        # everything queued before it is applied once its fetches are in
                        try:
                            self._fetch_many(fetch)
                        except Exception as e:
                            item[1].error = e
                            raise
                        finally:
                            fetch = {}
                            item[1].set()
                    elif item[0] == "refetch":
                        kind, record_id = P.classify(item[1])
                        if kind in ("node", "request") and self._caching:
                            fetch[(kind, record_id)] = None
                    else:
                        self._apply_event(*item, fetch=fetch)
                except StoreError as e:
                    log.warning("ZooKeeper cache update failed: %s (re-walked on reconnect)", e)
                except Exception:
                    log.exception("ZooKeeper cache update failed")
            try:
                self._fetch_many(fetch)
            except StoreError as e:
                log.warning("ZooKeeper cache update failed: %s (re-walked on reconnect)", e)
            except Exception:
                log.exception("ZooKeeper cache update failed")
            if self._events.empty():
                self._notify_watchers()

    def _fetch_many(self, wanted):
        """Read the records ``wanted`` (``(kind, id)`` keys) into the cache, together."""
        if not wanted:
            return
        keys = list(wanted)
        paths = [P.node_path(record_id) if kind == "node" else P.request_path(record_id)
                 for kind, record_id in keys]
        for (kind, record_id), (data, stat) in zip(keys, self._get_many(paths)):
            if stat is None:
                self._cache.drop(kind, record_id)
            else:
                self._into_cache(kind, record_id, data, stat)

    def _apply_event(self, event_type, path, fetch=None):
        kind, record_id = P.classify(path)
        if kind in ("node", "request"):
            if event_type == EventType.DELETED:
                self._cache.drop(kind, record_id)
                if kind == "request":       # its lock directory goes with it, sooner or later
                    self._assured_lock_paths.discard(f"{P.REQUEST_LOCK_ROOT}/{record_id}")
                return
            ours = event_type == EventType.CHANGED and self._own_set_seen(path)
            if not self._caching:
                return
            if event_type == EventType.CREATED or ours:
                # a new znode already cached is one we wrote (ids are never reused); a change
                # of ours is already cached (write-through): nothing to read
                if self._cache.has(kind, record_id):
                    return
            if fetch is None:
                self._fetch_into_cache(kind, record_id)
            else:
                fetch[(kind, record_id)] = None
        elif kind in ("node-lock", "request-lock"):
            if not self._caching:
                return
            cache_kind = "node" if kind == "node-lock" else "request"
            parent, _, name = path.rpartition("/")
            lock_dir = (P.node_path(record_id) + "/lock" if kind == "node-lock"
                        else f"{P.REQUEST_LOCK_ROOT}/{record_id}")
            if parent == lock_dir and P.is_lock_contender(name):
                created = event_type == EventType.CREATED
                if name in self._released_contenders:
                    if created:
                        return      # ours, already released: its create is old news
                    self._released_contenders.discard(name)
                # a delete is always applied: a walk that read the lock directory before our
                # release deleted it may have put the name back after we took it out
                self._cache.contender_event(cache_kind, record_id, name, created)
            elif path == lock_dir and event_type == EventType.DELETED:
                self._cache.clear_lockers(cache_kind, record_id)
        elif path.startswith(P.COMPONENT_ROOT):
            self._components_gen += 1

    def _contenders(self, lock_path):
        return [c for c in self._children(lock_path) if P.is_lock_contender(c)]

    def _fetch_into_cache(self, kind, record_id):
        path = P.node_path(record_id) if kind == "node" else P.request_path(record_id)
        data, stat = self._get_or_none(path)
        if stat is None:
            self._cache.drop(kind, record_id)
            return
        self._into_cache(kind, record_id, data, stat)

    def _into_cache(self, kind, record_id, data, stat):
        record = self._record_from(kind, record_id, data, stat)
        if record is not None:
            self._cache.put(kind, record, stat.mzxid)
        elif kind == "node" and not data:
            self._empty_nodes.add(record_id)

    @staticmethod
    def _record_from(kind, record_id, data, stat):
        d = _decode(data, f"{kind} {record_id}")
        if d is None:
            return None
        cls = Node if kind == "node" else NodeRequest
        return cls.from_dict(d, id=record_id, version=stat.version)

    def _rewalk(self):
        """Read both trees again (at start and after a reconnect: events may have been missed)."""
        with self._own_sets_lock:
            self._own_sets.clear()
        with collector_paused():        # ten thousand records made in a row
            for kind, root in (("node", P.NODE_ROOT), ("request", P.REQUEST_ROOT)):
                self._walk_tree(kind, root)

    def _walk_tree(self, kind, root):
        """Read one tree (nodes or requests) and its lock contenders into the cache."""
        ids = self._children(root)
        # only the lock directories of the records listed: a lock directory outlives its
        # request by hours (thousands of them), and a record created after this listing
        # comes with its contenders as watch events, queued behind this walk
        lock_dirs = {i: (f"{root}/{i}/lock" if kind == "node"
                         else f"{P.REQUEST_LOCK_ROOT}/{i}") for i in ids}
        got = self._get_many([f"{root}/{i}" for i in ids])
        listed = self._children_many(list(lock_dirs.values()))
        records = {}
        for record_id, (data, stat) in zip(ids, got):
            if stat is None:
                continue
            record = self._record_from(kind, record_id, data, stat)
            if record is not None:
                records[record_id] = (record, stat.mzxid)
            elif kind == "node" and not data:
                self._empty_nodes.add(record_id)
        lockers = {}
        for record_id, lock_dir in lock_dirs.items():
            names = {c for c in listed[lock_dir] if P.is_lock_contender(c)}
            if names:
                lockers[record_id] = names
        self._cache.replace(kind, records, lockers)

    # -- nodes -------------------------------------------------------------------------------------

    def create_node(self, node):
        now = time.time()
        if node.state_time is None:
            node.state_time = now
        if node.created_time is None:
            node.created_time = node.state_time
        path, stat = self._create(P.NODE_ROOT + "/", _encode(node), sequence=True)
        node.id = path.rsplit("/", 1)[1]
        node.version = stat.version
        if len(self._new_nodes) > 10000:
            self._new_nodes.clear()
        self._new_nodes.add(node.id)
        self._put_own("node", node, stat.mzxid)
        return node

    def get_node(self, node_id):
        if not node_id:
            return None
        data, stat = self._get_or_none(P.node_path(node_id))
        if stat is None:
            return None
        return self._record_from("node", node_id, data, stat)

    def list_nodes(self, shared=False):
        self._ensure_caches()
        return self._cache.copies("node", shared)

    def node_changes(self, since):
        self._ensure_caches()
        return self._cache.changed_since("node", since)

    def request_changes(self, since):
        self._ensure_caches()
        return self._cache.changed_since("request", since)

    def update_node(self, node, check_version=False):
        self._update("node", P.node_path(node.id), node, check_version)

    def update_together(self, nodes=(), requests=(), release=(), delete_requests=()):
        writes = [("node", P.node_path(n.id), n) for n in nodes] + \
                 [("request", P.request_path(r.id), r) for r in requests]
        # the contenders of locks of ours in this session (others are released as usual); a
        # deleted request's lock directory goes after our contender in it
        releasing = [lock for lock in release if self._ours_now(lock)]
        lock_dirs = {f"{P.REQUEST_LOCK_ROOT}/{request_id}" for request_id in delete_requests}
        if len(writes) + len(releasing) + len(delete_requests) < 2:
            for kind, path, record in writes:     # a plain write: no transaction needed
                self._update(kind, path, record, check_version=True)
            for request_id in delete_requests:
                self.delete_request(request_id)
            return
        txn = self._client.transaction()
        for kind, path, record in writes:
            txn.set_data(path, _encode(record), -1 if record.version is None else record.version)
        for lock in releasing:
            txn.delete(f"{lock.path}/{lock.token[0].node}")
            if lock.path in lock_dirs:
                txn.delete(lock.path)
        for request_id in delete_requests:
            txn.delete(P.request_path(request_id))
        for _, path, _ in writes:
            self._own_set_begin(path)
        try:
            self._wait_connected()
            results = self._wait(txn.commit_async(), f"write {len(writes)} records")
        except BaseException:
            for _, path, _ in writes:
                self._own_set_failed(path)
            raise
        failed = next(((i, r) for i, r in enumerate(results)
                       if isinstance(r, Exception) and not isinstance(r, kze.RolledBackError)),
                      None)
        if failed is not None or len(results) != len(txn.operations):
            for _, path, _ in writes:
                self._own_set_failed(path)
            index, error = failed or (0, None)
            if index >= len(writes):
                # a contender of ours is gone (deleted by hand?), another session queued on a
                # request's lock, a request went: the writes alone, then the rest as usual
                self.update_together(nodes, requests)
                for request_id in delete_requests:
                    self.delete_request(request_id)
                return
            kind, _, record = writes[index]
            if isinstance(error, kze.NoNodeError):
                raise NotFoundError(f"{kind} {record.id} does not exist (any more)")
            if isinstance(error, kze.BadVersionError):
                raise ConflictError(f"{kind} {record.id} changed since version "
                                    f"{record.version}")
            raise StoreError(f"ZooKeeper: writing {len(writes)} records together failed: "
                             f"{error!r}")
        for (kind, _, record), stat in zip(writes, results):
            record.version = stat.version
            self._put_own(kind, record, stat.mzxid)
        for lock in releasing:
            self._released_with_write(lock)
            if lock.path in lock_dirs:
                self._assured_lock_paths.discard(lock.path)
        for request_id in delete_requests:
            self._drop_own("request", request_id)

    def _ours_now(self, lock):
        """A lock of ours, held in this session, whose contender we know."""
        return (not lock.released and lock.token[1] == self._generation
                and bool(lock.token[0].node))

    def _released_with_write(self, lock):
        """Book a lock of ours whose contender a transaction of ours deleted."""
        with self._held_lock:
            if self._held.get(lock.path) is lock:
                del self._held[lock.path]
        recipe = lock.token[0]
        lock.released = True
        recipe.is_acquired = False
        if self._caching:
            self._released_contenders.add(recipe.node)
        self._track_lock(lock.path, recipe.node, add=False)

    def _update(self, kind, path, record, check_version):
        version = record.version if check_version and record.version is not None else -1
        cached = kind in ("node", "request")
        if cached:
            self._own_set_begin(path)
        try:
            stat = self._set(path, _encode(record), version)
        except kze.NoNodeError:
            if cached:
                self._own_set_failed(path)
            raise NotFoundError(f"{kind} {record.id} does not exist (any more)") from None
        except kze.BadVersionError:
            if cached:
                self._own_set_failed(path)
            raise ConflictError(f"{kind} {record.id} changed since version {record.version}") \
                from None
        except BaseException:
            if cached:
                self._own_set_failed(path)
            raise
        record.version = stat.version
        if kind in ("node", "request"):
            self._put_own(kind, record, stat.mzxid)

    def delete_node(self, node_id):
        path = P.node_path(node_id)
        lock_dir = path + "/lock"
        self._assured_lock_paths.discard(lock_dir)
        with self._held_lock:
            held = self._held.pop(lock_dir, None)   # the lock goes with the record
        if held is not None and self._delete_locked_node(path, node_id, held):
            return
        data, stat = self._get_or_none(path)
        if stat is None:
            return
        d = _decode(data, f"node {node_id}")
        if d is not None:
            # Like Nodepool: mark it deleted first, so a racing lock holder sees why it vanished.
            d["state"] = "deleted"
            self._own_set_begin(path)
            try:
                self._set(path, json.dumps(d).encode("utf-8"), stat.version)
            except BaseException:
                self._own_set_failed(path)
                if not isinstance(sys.exc_info()[1], (kze.NoNodeError, kze.BadVersionError)):
                    raise
        self._delete(path, recursive=True)
        self._drop_own("node", node_id)

    def _delete_locked_node(self, path, node_id, held):
        """Delete a node whose lock we hold in one transaction (our contender, the lock
        directory, the node) instead of a read, a write and a recursive walk of six calls.
        The record was marked ``deleted`` by an earlier write unless the cache says otherwise;
        False when the fast path does not apply (then the caller takes the general one)."""
        cached = self._cache.peek("node", node_id)
        if cached is None or cached.state != NodeState.DELETED \
                or not self._delete_with_lock(path, held):
            return False
        self._drop_own("node", node_id)
        return True

    def _delete_with_lock(self, path, held):
        """Delete ``path`` together with the lock on it we hold (our contender and the lock's
        directory), in one transaction.  False when that cannot be done (another contender
        queued, a child we do not know of, a lost session or connection): nothing changed."""
        recipe, generation = held.token
        if generation != self._generation or not recipe.node:
            return False
        txn = self._client.transaction()
        txn.delete(f"{recipe.path}/{recipe.node}")
        txn.delete(recipe.path)
        txn.delete(path)
        try:
            self._wait_connected()
            results = self._wait(txn.commit_async(), f"delete {path}")
        except StoreError:
            return False
        if any(isinstance(r, Exception) for r in results):
            return False
        self._released_with_write(held)
        return True

    # -- node requests -----------------------------------------------------------------------------

    def submit_request(self, request, priority="100", ephemeral=True):
        now = time.time()
        if request.state_time is None:
            request.state_time = now
        if request.created_time is None:
            request.created_time = now
        if not request.event_id:
            request.event_id = uuid.uuid4().hex
        path, stat = self._create(f"{P.REQUEST_ROOT}/{priority}-", _encode(request),
                                  ephemeral=ephemeral, sequence=True)
        request.id = path.rsplit("/", 1)[1]
        request.version = stat.version
        self._put_own("request", request, stat.mzxid)
        return request

    def get_request(self, request_id):
        if not request_id:
            return None
        data, stat = self._get_or_none(P.request_path(request_id))
        if stat is None:
            return None
        return self._record_from("request", request_id, data, stat)

    def list_requests(self, shared=False):
        self._ensure_caches()
        return self._cache.copies("request", shared)

    def update_request(self, request, check_version=False):
        self._update("request", P.request_path(request.id), request, check_version)

    def delete_request(self, request_id):
        path = P.request_path(request_id)
        lock_dir = f"{P.REQUEST_LOCK_ROOT}/{request_id}"
        with self._held_lock:
            held = self._held.get(lock_dir)
        # under our lock (a launcher finishing a request): the lock and its directory go in
        # the same transaction, so no empty lock directory is left for the lock collector
        if held is not None and self._delete_with_lock(path, held):
            self._assured_lock_paths.discard(lock_dir)
        else:
            self._delete(path)
        self._drop_own("request", request_id)

    # -- locks -------------------------------------------------------------------------------------

    def lock(self, path, blocking=False, timeout=None, identifier=None):
        return self._lock_finish(self._lock_start(path, identifier), blocking, timeout)

    def _lock_start(self, path, identifier):
        """Check and send the first attempt at a lock (answered in ``_lock_finish``): several
        locks tried together (``try_locks``: a request's and its nodes') cost one round
        trip."""
        with self._held_lock:
            if path in self._held:
                raise LockError(f"lock {path} is already held by this session")
        self._wait_connected()
        # A node's lock lives inside the node's znode: creating the lock's parents would bring
        # a deleted node back as an empty znode, so a node lock is only taken in place.
        kind, record_id = P.classify(path + "/x")
        in_record = kind == "node-lock"
        recipe = KazooLock(self._client, path, identifier)
        if path in self._assured_lock_paths:
            recipe.assured_path = True      # skip the exists/create round trip
        attempt = _LockAttempt(path, identifier, recipe, in_record, self._generation)
        fresh = in_record and record_id in self._new_nodes
        if fresh:
            self._new_nodes.discard(record_id)
        try:
            if (recipe.assured_path or in_record) and not fresh:
                # the directory exists (we used it before, or it is a node's: made with the
                # node's first lock): try it in one round trip
                attempt.tried = self._send_try(recipe)
            else:
                attempt.created = self._send_new_lock(recipe)
        except kze.KazooException as e:
            attempt.error = e
        return attempt

    def _lock_finish(self, attempt, blocking, timeout):
        path, recipe, in_record = attempt.path, attempt.recipe, attempt.in_record
        try:
            try:
                if attempt.error is not None:
                    raise attempt.error
                acquired = None
                if attempt.tried is not None:
                    acquired = self._finish_try(recipe, attempt.tried)
                    if acquired is None and not recipe.assured_path:
                        acquired = self._finish_new_lock(
                            recipe, self._send_new_lock(recipe), in_record)
                else:
                    acquired = self._finish_new_lock(recipe, attempt.created, in_record)
                if acquired is None:
                    acquired = self._finish_try(recipe, self._send_try(recipe))
                    if acquired is None:
                        raise kze.NoNodeError(path)
                if not acquired and blocking:
                    # held by someone: queue for it the recipe's way (a new contender)
                    recipe.create_tried = False
                    acquired = recipe.acquire(blocking=True, timeout=timeout)
            except kze.NoNodeError:
                self._assured_lock_paths.discard(path)
                if in_record:
                    raise LockError(f"lock {path}: its node does not exist (any more)") \
                        from None
                # the lock's parent was removed since we last used it: ensure it again
                recipe = KazooLock(self._client, path, attempt.identifier)
                acquired = recipe.acquire(blocking=blocking, timeout=timeout)
            self._assured_lock_paths.add(path)
            if len(self._assured_lock_paths) > 20000:
                self._assured_lock_paths.clear()
        except kze.LockTimeout:
            raise LockError(f"lock {path}: not acquired within {timeout}s") from None
        except kze.SessionExpiredError:
            raise SessionLostError(f"ZooKeeper session expired while locking {path}") from None
        except kze.KazooException as e:
            self._contender_may_exist(recipe)
            raise StoreError(f"lock {path}: {e!r}") from e
        except StoreError:
            self._contender_may_exist(recipe)
            raise
        if not acquired:
            raise LockError(f"lock {path} is held by another session")
        if attempt.generation != self._generation:
            # The session expired while we waited: kazoo's retry made a new contender in the new
            # session and got the lock there.  Our caller must hear of the loss, and _release
            # would not delete a contender of an older generation: give it back now.
            self._give_back(recipe, path)
            raise SessionLostError(f"ZooKeeper session expired while locking {path}")
        lock = Lock(self, path, token=(recipe, attempt.generation))
        with self._held_lock:
            if path in self._held:   # another thread of ours won the race meanwhile
                recipe.release()
                raise LockError(f"lock {path} is already held by this session")
            self._held[path] = lock
        self._track_lock(path, recipe.node, add=True)
        return lock

    def _send_try(self, recipe):
        """Try a lock without waiting, in one round trip: our contender's create and the
        listing of the lock directory are sent together (the server applies a session's
        requests in order, so the listing has our contender in it).  kazoo's recipe waits for
        the create before it lists.  The contender names and the rule (the lowest sequence
        number holds it) are the recipe's, so other clients of the lock see no difference."""
        recipe.create_tried = True
        return (self._client.create_async(recipe.create_path, recipe.data, ephemeral=True,
                                          sequence=True),
                self._client.get_children_async(recipe.path))

    def _finish_try(self, recipe, sent):
        """The answer to ``_send_try``: True or False; None when the directory does not
        exist."""
        created, listed = sent
        try:
            path = self._wait(created, f"create {recipe.create_path}")
        except kze.NoNodeError:
            return None
        recipe.node = path.rsplit("/", 1)[1]
        children = self._wait(listed, f"get_children {recipe.path}")
        ours = recipe.node[len(recipe.prefix):]
        for child in children:
            match = recipe._contenders_re.search(child)
            if match is not None and match.group(1) < ours:
                self._give_back_contender(recipe)
                return False
        recipe.assured_path = True
        recipe.is_acquired = True
        return True

    def _give_back_contender(self, recipe):
        """Delete the contender of a lock we did not get (one we cannot delete now is
        deleted on reconnect, like any stale contender)."""
        contender = f"{recipe.path}/{recipe.node}"
        recipe.node = None
        try:
            self._wait(self._client.delete_async(contender), f"delete {contender}")
        except kze.NoNodeError:
            pass
        except (StoreError, kze.KazooException):
            self._delete_on_reconnect((self._generation, contender))

    def _send_new_lock(self, recipe):
        """A lock whose directory does not exist yet (every new request's lock): create the
        directory and our contender in one transaction.  Then we are its only contender, so we
        hold it, in one round trip instead of four."""
        txn = self._client.transaction()
        txn.create(recipe.path)
        txn.create(recipe.create_path, recipe.data, ephemeral=True, sequence=True)
        return txn.commit_async()

    def _finish_new_lock(self, recipe, sent, in_record=False):
        """The answer to ``_send_new_lock``: True, or None when the directory exists (or,
        unless ``in_record``, its parent does not): the caller takes the usual recipe path;
        with ``in_record`` a missing parent raises NoNodeError and an existing directory is
        used as it is (never re-created with its parents)."""
        results = self._wait(sent, f"create lock {recipe.path}")
        if len(results) != 2 or not isinstance(results[1], str):
            if in_record:
                if isinstance(results[0], kze.NoNodeError):
                    raise kze.NoNodeError(recipe.path)
                recipe.assured_path = True
            return None
        recipe.node = results[1].rsplit("/", 1)[1]
        recipe.create_tried = True
        recipe.assured_path = True
        recipe.is_acquired = True
        return True

    def _track_lock(self, path, contender, add):
        kind, record_id = P.classify(path + "/x")
        if kind not in ("node-lock", "request-lock") or not contender:
            return
        cache_kind = "node" if kind == "node-lock" else "request"
        if add:
            self._cache.add_locker(cache_kind, record_id, contender)
        else:
            self._cache.remove_locker(cache_kind, record_id, contender)

    def _release(self, lock):
        recipe, generation = lock.token
        with self._held_lock:
            if self._held.get(lock.path) is lock:
                del self._held[lock.path]
        contender = recipe.node
        if generation != self._generation or self._client is None:
            recipe.is_acquired = False   # the session that held it is gone, and so is the lock
            return
        if contender and self._caching:
            if len(self._released_contenders) > 10000:
                self._released_contenders.clear()    # delete events never seen (lost session)
            self._released_contenders.add(contender)
        try:
            self._wait_connected()
            recipe.release()
        except (StoreError, kze.KazooException) as e:
            if contender:
                # our contender may outlive the outage with our session: delete it once we are
                # connected again, or every later acquire (ours too) would queue behind it
                log.warning("releasing lock %s: %s (its contender is deleted on reconnect)",
                            lock.path, e)
                self._delete_on_reconnect((generation, f"{recipe.path}/{contender}"))
            else:
                log.warning("releasing lock %s: %s (it ends with the session)", lock.path, e)
        self._track_lock(lock.path, contender, add=False)

    def holds(self, lock):
        return not lock.released and lock.token[1] == self._generation

    def _give_back(self, recipe, path):
        """Release a lock nobody will own; a contender we cannot delete now goes on reconnect."""
        contender = recipe.node
        try:
            recipe.release()
        except kze.KazooException as e:
            if contender:
                log.warning("releasing lock %s: %s (its contender is deleted on reconnect)",
                            path, e)
                self._delete_on_reconnect((self._generation, f"{recipe.path}/{contender}"))

    def _contender_may_exist(self, recipe):
        """A lock attempt whose answer was lost may have left our contender on the server: it
        would hold the lock (or queue for it) for as long as our session lives, and the node
        under it could never be cleaned up.  Its name starts with the attempt's own prefix:
        any such child is deleted once we are connected."""
        self._delete_on_reconnect((self._generation, recipe.path, recipe.prefix))

    def _delete_on_reconnect(self, entry):
        """Queue a contender of ours for deletion once we are connected: ``(generation, path)``
        or, for an attempt whose answer was lost, ``(generation, lock directory, prefix)``."""
        with self._stale_lock:
            self._stale_contenders.append(entry)
        self._session_events.put(_STALE_CONTENDERS)

    def _delete_stale_contenders(self):
        """Delete the contenders of locks released while the connection was broken (see
        ``_release``); those of a lost session went with it.  Kept for the next reconnect when
        the connection breaks again meanwhile."""
        with self._stale_lock:
            stale, self._stale_contenders = self._stale_contenders, []
        left = []
        for entry in stale:
            generation, path = entry[0], entry[1]
            if generation != self._generation:
                continue
            try:
                if len(entry) == 3:       # a lock attempt's possible contender (by prefix)
                    for child in self._children(path):
                        if child.startswith(entry[2]):
                            self._delete(f"{path}/{child}")
                            log.info("deleted the contender %s/%s of a lock attempt whose "
                                     "answer was lost", path, child)
                    continue
                self._wait(self._client.delete_async(path), f"delete {path}")
                log.info("deleted the contender %s of a lock released during an outage", path)
            except kze.NoNodeError:
                pass
            except StoreError:
                left.append(entry)
        if left:
            with self._stale_lock:
                self._stale_contenders.extend(left)

    def is_locked(self, path):
        return bool(self._contenders(path))

    def sync_nodes(self):
        """Catch the node cache up with the server in one round trip, without listing.

        After a ``sync`` answers, the server has sent us the watch event of every change
        committed before it (a session gets its events before any later answer), and the
        watch callback queued each of them as it was read.  A marker queued now is reached by
        the cache thread once all of them are applied and their records fetched."""
        self._ensure_caches()
        self._wait_connected()
        self._wait(self._client.sync_async(P.NODE_ROOT), f"sync {P.NODE_ROOT}")
        caught_up = threading.Event()
        caught_up.error = None
        self._events.put(("barrier", caught_up))
        deadline = time.monotonic() + self.timeout
        while not caught_up.wait(0.1):
            if self._stopping or time.monotonic() > deadline:
                raise StoreError(f"ZooKeeper at {self._describe()}: the node cache did not "
                                 f"catch up within {self.timeout:.0f}s")
        if caught_up.error is not None:
            raise StoreError(f"ZooKeeper at {self._describe()}: the node cache could not catch "
                             f"up: {caught_up.error}")

    def locked_node_ids(self):
        self._ensure_caches()
        return self._cache.locked_ids("node")

    def locked_request_ids(self):
        self._ensure_caches()
        return self._cache.locked_ids("request")

    def remove_stale_request_locks(self, older_than):
        # read together (a long-running site may have many thousands of these): stat the
        # lock directories that may be old enough, then check the old, empty ones' requests,
        # then delete those left.  Nothing writes a lock directory's data, so the mtime read
        # once stays true: a directory known to be younger than the cutoff is not read again
        # until it may be old enough (one deleted and created again is only younger still).
        self._wait_connected()
        cutoff_ms = (time.time() - older_than) * 1000
        ids = self._children(P.REQUEST_LOCK_ROOT)
        known = self._lock_dir_mtimes
        ids = [i for i in ids if known.get(i, cutoff_ms - 1) < cutoff_ms]
        got = self._get_many([f"{P.REQUEST_LOCK_ROOT}/{i}" for i in ids])
        mtimes = {i: m for i, m in known.items() if m >= cutoff_ms}
        mtimes.update((i, stat.mtime) for i, (_, stat) in zip(ids, got) if stat is not None)
        self._lock_dir_mtimes = mtimes
        old = [(i, stat) for i, (_, stat) in zip(ids, got)
               if stat is not None and not stat.numChildren and stat.mtime < cutoff_ms]
        gone = self._get_many([P.request_path(i) for i, _ in old])
        deletes = [(i, self._client.delete_async(f"{P.REQUEST_LOCK_ROOT}/{i}", stat.version))
                   for (i, stat), (_, request_stat) in zip(old, gone) if request_stat is None]
        removed = 0
        for request_id, result in deletes:
            try:
                # not recursive: a contender that appeared since makes this fail, as it should
                self._wait(result, f"delete {P.REQUEST_LOCK_ROOT}/{request_id}")
                removed += 1
            except (kze.NoNodeError, kze.NotEmptyError, kze.BadVersionError):
                continue
        return removed

    def remove_empty_nodes(self):
        # the candidates come from the cache's reads (events and walks), so this reads only them
        self._ensure_caches()
        removed = 0
        for node_id in list(self._empty_nodes):
            self._empty_nodes.discard(node_id)
            path = P.node_path(node_id)
            data, stat = self._get_or_none(path)
            if stat is None or data:
                continue
            try:
                for child in self._children(path):
                    # not recursive: a held lock (a contender in it) keeps the entry
                    self._delete(f"{path}/{child}")
                # version-checked: a record written meanwhile is not deleted
                self._wait(self._client.delete_async(path, stat.version), f"delete {path}")
                removed += 1
            except (kze.NoNodeError, kze.BadVersionError):
                continue
            except kze.NotEmptyError:
                self._empty_nodes.add(node_id)      # somebody holds it: look again next time
        return removed

    # -- images ------------------------------------------------------------------------------------

    def create_build(self, build):
        if not build.id:
            build.id = uuid.uuid4().hex
        if build.state_time is None:
            build.state_time = time.time()
        try:
            _, stat = self._create(P.build_path(build.image, build.id), _encode(build))
        except kze.NodeExistsError:
            raise ConflictError(f"build {build.id} of image {build.image} already exists") \
                from None
        build.version = stat.version
        return build

    def get_build(self, image, build_id):
        data, stat = self._get_or_none(P.build_path(image, build_id))
        if stat is None:
            return None
        return self._build_from(image, build_id, data, stat)

    @staticmethod
    def _build_from(image, build_id, data, stat):
        build = ImageBuild.from_dict(_decode(data, f"build {image}/{build_id}") or {},
                                     id=build_id, version=stat.version)
        build.image = image
        return build

    def _build_keys(self, images):
        """``[(image, build id)]`` of every build of ``images``."""
        listed = self._children_many([P.builds_path(name) for name in images])
        return [(name, bid) for name in images for bid in listed[P.builds_path(name)]
                if bid != "lock"]

    def list_builds(self, image=None):
        images = [image] if image else self._children(P.IMAGE_ROOT)
        keys = self._build_keys(images)
        got = self._get_many([P.build_path(*key) for key in keys])
        found = [(stat.czxid, self._build_from(name, bid, data, stat))
                 for (name, bid), (data, stat) in zip(keys, got) if stat is not None]
        return [b for _, b in sorted(found, key=lambda item: item[0])]

    def _children_many(self, paths):
        """``{path: children}`` for every path (missing: []), read together: a walk of the
        image tree waits one round trip per level, not one per znode."""
        return {path: names if names is not None else []
                for path, names in zip(paths, self._answers("children", paths))}

    def _get_many(self, paths):
        """``[(data, stat)]`` for every path in order, (None, None) where missing."""
        return [got if got is not None else (None, None) for got in self._answers("get", paths)]

    def _answers(self, kind, paths):
        """The ``kind`` read (``"get"`` or ``"children"``) of every path, in order: None where
        the znode is missing; any other failed read raises ``StoreError``."""
        out = []
        for path, answer in zip(paths, self._read_many([(kind, p) for p in paths])):
            if isinstance(answer, kze.NoNodeError):
                answer = None
            elif isinstance(answer, Exception):
                raise StoreError(f"ZooKeeper at {self._describe()}: {kind} {path}: {answer!r}")
            out.append(answer)
        return out

    def _read_many(self, reads):
        """Answers to ``reads`` (``("get"|"children", path)``) in order, each a result or its
        exception: ``multiRead`` requests of ``MULTI_READ_BATCH`` reads, all sent before the
        first answer is awaited."""
        if not reads:
            return []
        self._wait_connected()
        sent = [multi_read_async(self._client, reads[i:i + MULTI_READ_BATCH])
                for i in range(0, len(reads), MULTI_READ_BATCH)]
        out = []
        for result in sent:
            out.extend(self._wait(result, f"multiRead of {len(reads)} znodes"))
        return out

    def update_build(self, build, check_version=False):
        self._update("build", P.build_path(build.image, build.id), build, check_version)

    def delete_build(self, image, build_id):
        self._delete(P.build_path(image, build_id), recursive=True)

    def create_upload(self, upload):
        if self._exists(P.build_path(upload.image, upload.build_id)) is None:
            raise NotFoundError(f"build {upload.build_id} of image {upload.image} does not exist")
        if upload.state_time is None:
            upload.state_time = time.time()
        path, stat = self._create(
            P.uploads_path(upload.image, upload.build_id, upload.provider) + "/",
            _encode(upload), sequence=True)
        upload.id = path.rsplit("/", 1)[1]
        upload.version = stat.version
        return upload

    def restore_upload(self, upload):
        if self._exists(P.build_path(upload.image, upload.build_id)) is None:
            raise NotFoundError(f"build {upload.build_id} of image {upload.image} does not exist")
        if upload.state_time is None:
            upload.state_time = time.time()
        parent = P.uploads_path(upload.image, upload.build_id, upload.provider)
        try:
            _, stat = self._create(f"{parent}/{upload.id}", _encode(upload))
        except kze.NodeExistsError:
            raise ConflictError(f"upload {upload.id} of {upload.image} build {upload.build_id} "
                                f"on {upload.provider} already exists") from None
        upload.version = stat.version
        # A sequential child is numbered by its parent's child-change count (cversion).  Raise
        # that count past the restored id, or a later create_upload would collide with it:
        # each create+delete of a scratch child in one transaction adds two and is never seen.
        need = int(upload.id) + 1 - self._exists(parent).cversion
        if need > 0:
            txn = self._client.transaction()
            for _ in range((need + 1) // 2):
                txn.create(f"{parent}/restore-scratch")
                txn.delete(f"{parent}/restore-scratch")
            self._wait_connected()
            self._wait(txn.commit_async(), f"raise the upload sequence of {parent}")
        return upload

    def get_upload(self, image, build_id, provider, upload_id):
        data, stat = self._get_or_none(P.upload_path(image, build_id, provider, upload_id))
        if stat is None:
            return None
        return self._upload_from(image, build_id, provider, upload_id, data, stat)

    @staticmethod
    def _upload_from(image, build_id, provider, upload_id, data, stat):
        upload = ImageUpload.from_dict(
            _decode(data, f"upload {image}/{build_id}/{provider}/{upload_id}") or {},
            id=upload_id, version=stat.version)
        upload.image, upload.build_id, upload.provider = image, build_id, provider
        return upload

    def list_uploads(self, image=None, build_id=None, provider=None):
        images = [image] if image else self._children(P.IMAGE_ROOT)
        builds = [(name, build_id) for name in images] if build_id else self._build_keys(images)
        if provider:
            targets = [(name, bid, provider) for name, bid in builds]
        else:
            listed = self._children_many([P.providers_path(*b) for b in builds])
            targets = [(name, bid, prov) for name, bid in builds
                       for prov in listed[P.providers_path(name, bid)]]
        listed = self._children_many([P.uploads_path(*t) for t in targets])
        keys = [(*t, uid) for t in targets for uid in listed[P.uploads_path(*t)] if uid != "lock"]
        got = self._get_many([P.upload_path(*key) for key in keys])
        found = [(stat.czxid, self._upload_from(*key, data, stat))
                 for key, (data, stat) in zip(keys, got) if stat is not None]
        return [u for _, u in sorted(found, key=lambda item: item[0])]

    def update_upload(self, upload, check_version=False):
        self._update("upload", P.upload_path(upload.image, upload.build_id, upload.provider,
                                             upload.id), upload, check_version)

    def delete_upload(self, image, build_id, provider, upload_id):
        self._delete(P.upload_path(image, build_id, provider, upload_id), recursive=True)

    def list_image_names(self):
        names = []
        for name in self._children(P.IMAGE_ROOT):
            children = self._children(P.image_path(name))
            if "pause" in children or "request-build" in children or any(
                    b != "lock" for b in self._children(P.builds_path(name))):
                names.append(name)
        return sorted(names)

    def set_image_paused(self, image, paused):
        if paused:
            try:
                self._create(P.pause_path(image))
            except kze.NodeExistsError:
                pass
        else:
            self._delete(P.pause_path(image))

    def is_image_paused(self, image):
        return self._exists(P.pause_path(image)) is not None

    def request_image_build(self, image):
        try:
            self._create(P.build_request_path(image))
        except kze.NodeExistsError:
            pass

    def get_image_build_request(self, image):
        stat = self._exists(P.build_request_path(image))
        return stat.created if stat is not None else None

    def remove_image_build_request(self, image):
        self._delete(P.build_request_path(image))

    # -- components --------------------------------------------------------------------------------

    def register_component(self, component):
        if component.kind not in P.COMPONENT_KINDS:
            raise StoreError(f"component kind {component.kind!r} is not one of "
                             f"{', '.join(P.COMPONENT_KINDS)}")
        self._create_component(component)
        with self._components_lock:
            self._components[id(component)] = component
        return component

    def _create_component(self, component):
        generation = self._generation        # read before: a create is never credited to a
        hostname = component.hostname or socket.gethostname()   # session newer than its own
        component.hostname = hostname
        path, stat = self._create(f"{P.component_root(component.kind)}/{hostname}",
                                  _encode(component, sort_keys=True),
                                  ephemeral=True, sequence=True)
        component.id = path.rsplit("/", 1)[1]
        component.version = stat.version
        self._component_generation[id(component)] = generation
        self._components_gen += 1

    def _reregister_components(self):
        with self._components_lock:
            components = list(self._components.values())
        for component in components:
            with self._register_lock:
                if self._component_generation.get(id(component)) == self._generation:
                    continue        # update_component already re-created it in this session
                self._create_component(component)
            log.info("re-registered %s component %s", component.kind, component.id)

    def update_component(self, component):
        old_id = component.id
        path = f"{P.component_root(component.kind)}/{component.id}"
        try:
            stat = self._set(path, _encode(component, sort_keys=True))
            component.version = stat.version
            self._components_gen += 1
        except kze.NoNodeError:
            with self._components_lock:
                registered = id(component) in self._components
            if not registered:
                raise NotFoundError(f"component {component.kind}/{component.id} is not "
                                    f"registered") from None
            # Our record went with an expired session.  The session thread re-registers every
            # component once the new session is up; whichever of us comes first creates it,
            # the other must not create a second record for the same component.
            with self._register_lock:
                if component.id != old_id:
                    return self.update_component(component)
                self._create_component(component)

    def unregister_component(self, component):
        with self._components_lock:
            self._components.pop(id(component), None)
            self._component_generation.pop(id(component), None)
        if component.id:
            self._delete(f"{P.component_root(component.kind)}/{component.id}")
            self._components_gen += 1

    def list_components(self, kind=None):
        """Components, re-read only after the watch reported a change below ``components``
        (launchers list pools on every pass)."""
        self._ensure_watch()
        gen = self._components_gen
        cached = self._components_cache.get(kind)
        if cached is not None and cached[0] == gen:
            return [fresh_copy(c) for c in cached[1]]
        found = self._read_components(kind)
        self._components_cache[kind] = (gen, found)
        return [fresh_copy(c) for c in found]

    def _read_components(self, kind):
        kinds = [kind] if kind else self._children(P.COMPONENT_ROOT)
        listed = self._children_many([P.component_root(k) for k in kinds])
        keys = [(k, name) for k in kinds for name in listed[P.component_root(k)]]
        got = self._get_many([f"{P.component_root(k)}/{name}" for k, name in keys])
        found = []
        for (k, name), (data, stat) in zip(keys, got):
            if stat is None:
                continue
            comp = Component.from_dict(_decode(data, f"component {k}/{name}") or {},
                                       id=name, version=stat.version)
            comp.kind = comp.kind or k
            found.append(comp)
        return sorted(found, key=lambda c: (c.kind, c.id))
