"""The state store contract.

Everything the launcher, builder, CLI and client share goes through this interface; there is no
other channel between processes.  Two implementations exist: ``SQLiteStore`` (embedded, one host,
several processes on one file) and ``ZooKeeperStore`` (Nodepool's own layout, several hosts).

Semantics follow ZooKeeper so that both implementations behave alike:

* A store object owns one *session*.  Locks and ephemeral records belong to the session and vanish
  when it ends: on ``stop()``, when the process dies, or when the session expires (missed
  heartbeats / ZooKeeper session timeout).  Listeners registered with ``add_session_listener`` are
  told ``"lost"`` when that happens to us, so in-memory beliefs about held locks can be dropped.
* Locks are named by the ZooKeeper path Nodepool uses for them (see the ``*_lock_path`` helpers);
  they are not re-entrant and are never held by two sessions at once.
* Records are returned as fresh objects (callers may mutate them); ``record.version`` is the store's
  change counter for that record.  ``update_*(record, check_version=True)`` is compare-and-set.
* All methods are safe to call from several threads of one process.
* Methods raise ``StoreError`` subclasses only: ``NotFoundError`` for a missing record on update,
  ``LockError`` for a lock not acquired, ``ConflictError`` for a lost compare-and-set,
  ``SessionLostError`` when the session died under the call.  ``get_*`` returns None for a missing
  record instead of raising.
"""
import abc
import contextlib
import threading

from ..errors import ConflictError, LockError, NotFoundError

from .zk import paths as P    # Nodepool's layout (pure functions), shared by both stores


# -- lock paths (identical to Nodepool's, so ZooKeeper locks interoperate) -------------------------

def node_lock_path(node_id):
    return f"{P.node_path(node_id)}/lock"


def request_lock_path(request_id):
    return f"{P.REQUEST_LOCK_ROOT}/{request_id}"


def image_build_lock_path(image):
    """One build of an image at a time, across all builders."""
    return f"{P.builds_path(image)}/lock"


def build_lock_path(image, build_id):
    return f"{P.build_path(image, build_id)}/lock"


def upload_lock_path(image, build_id, provider):
    """One upload of a build to a provider at a time."""
    return f"{P.uploads_path(image, build_id, provider)}/lock"


def upload_record_lock_path(image, build_id, provider, upload_id):
    return f"{P.upload_path(image, build_id, provider, upload_id)}/lock"


CAS_TRIES = 5


def compare_and_set(get, update, change, tries=CAS_TRIES):
    """Change a record that others may write too: ``get()`` reads it, ``change(record)`` edits
    it in place (returning False leaves it as it is), ``update(record, check_version=True)``
    writes it.  A lost compare-and-set means someone wrote in between: read and decide again.

    Returns the written record, or None when it is gone or ``change`` declined; raises
    ConflictError when it kept changing for ``tries`` attempts."""
    for _ in range(tries):
        record = get()
        if record is None or change(record) is False:
            return None
        try:
            return update(record, check_version=True) or record
        except ConflictError:
            continue
        except NotFoundError:
            return None
    raise ConflictError(f"the record kept changing under {tries} attempts to write it")


class Lock:
    """A held lock.  Release it with ``release()`` or use it as a context manager."""

    def __init__(self, store, path, token=None):
        self.store = store
        self.path = path
        self.token = token
        self.released = False

    def release(self):
        if not self.released:
            self.released = True
            self.store._release(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __repr__(self):
        return f"<Lock {self.path}{' released' if self.released else ''}>"


class ChangeWatcher:
    """Wakes a loop when the store may have changed.

    ``wait(timeout)`` returns True as soon as any record changed (written by anyone) since the
    previous ``wait`` returned, or False after ``timeout`` seconds.  Spurious True is allowed;
    a missed change is not.
    """

    def __init__(self):
        self._event = threading.Event()

    def notify(self):
        self._event.set()

    def wait(self, timeout=None):
        fired = self._event.wait(timeout)
        self._event.clear()
        return fired


class StateStore(abc.ABC):
    """Shared state of nodes, node requests, image builds/uploads, components and locks."""

    # -- lifecycle ---------------------------------------------------------------------------------

    @abc.abstractmethod
    def start(self):
        """Connect and open our session.  Raises StoreError with a clear message if impossible."""

    @abc.abstractmethod
    def stop(self):
        """Release our locks, remove our ephemeral records, close the session.  Idempotent."""

    @property
    @abc.abstractmethod
    def session_id(self):
        """An opaque id of our current session (changes when a lost session is replaced)."""

    def add_session_listener(self, callback):
        """Call ``callback(state)`` with ``"lost"`` when our session (locks, ephemerals) is gone,
        and ``"connected"`` when a new one is usable.  Called from a store thread: keep it short."""
        self._session_listeners().append(callback)

    def _session_listeners(self):
        if not hasattr(self, "_listeners"):
            self._listeners = []
        return self._listeners

    def _notify_session(self, state):
        for cb in list(self._session_listeners()):
            try:
                cb(state)
            except Exception:  # a listener must never break the store's thread
                pass

    @abc.abstractmethod
    def watch(self):
        """Return a new ``ChangeWatcher`` fed by every change to the store."""

    def watch_request(self, request_id):
        """A ``ChangeWatcher`` woken when this request changes or goes (spurious wakes are
        allowed).  A client waiting for its request uses this instead of ``watch()`` so that a
        store can follow just that record: a hundred waiting clients must not each receive
        every change of the whole system.  This default shares one ``watch()`` per store."""
        watcher = getattr(self, "_any_change_watcher", None)
        if watcher is None:
            watcher = self._any_change_watcher = self.watch()
        return watcher

    def read_request(self, request_id, watcher):
        """``get_request`` for a client waiting with ``watcher`` (from ``watch_request`` for
        this request): where the store can, the read also re-arms the watcher for the next
        change (one ZooKeeper call instead of a read and a watch).  Read with this after every
        ``watcher.wait``."""
        return self.get_request(request_id)

    # -- nodes -------------------------------------------------------------------------------------

    @abc.abstractmethod
    def create_node(self, node):
        """Store a new node; assign ``node.id`` (10-digit sequence), ``created_time`` and
        ``state_time`` when unset.  Returns the node (same object, updated)."""

    @abc.abstractmethod
    def get_node(self, node_id):
        """The node, or None."""

    @abc.abstractmethod
    def list_nodes(self, shared=False):
        """Every node, ordered by id.  Must be cheap enough to call every loop iteration.
        ``shared``: the records may be objects shared with the store's cache (no copy: for
        loops that only read a snapshot); the caller must not change them, and copies one
        (``record.copy()``) before writing it back."""

    @abc.abstractmethod
    def update_node(self, node, check_version=False):
        """Write the node back.  NotFoundError if it was deleted; ConflictError on a stale
        version when ``check_version``.  Bumps ``node.version``."""

    #: whether independent writes gain from being made side by side (a networked store whose
    #: every call is a round trip); the launcher then overlaps a pass's independent items
    parallel_writes = False

    def node_changes(self, since):
        """``(position, {id: node or None})``: the nodes created, changed (the new record, to
        be read, never changed) or deleted (None) since ``since``, a position an earlier call
        returned; the mapping is None when the store cannot tell (the first call, a reader far
        behind, a store without a change feed): then read ``list_nodes(shared=True)``.
        Positions belong to this store object.  Lets a launcher's pass cost what changed, not
        the size of the fleet."""
        return None, None

    def request_changes(self, since):
        """Like ``node_changes``, for requests (read ``list_requests(shared=True)`` when the
        mapping is None)."""
        return None, None

    @abc.abstractmethod
    def delete_node(self, node_id):
        """Remove the node and its lock.  Deleting a missing node is not an error."""

    # -- node requests -----------------------------------------------------------------------------

    @abc.abstractmethod
    def submit_request(self, request, priority="100", ephemeral=True):
        """Store a new request with id ``<priority>-<sequence>``.  An ephemeral request vanishes
        with our session (a requestor that dies takes its requests with it)."""

    @abc.abstractmethod
    def get_request(self, request_id):
        """The request, or None."""

    @abc.abstractmethod
    def list_requests(self, shared=False):
        """Every request, in handling order (priority, relative_priority, sequence).
        ``shared`` as for ``list_nodes``."""

    @abc.abstractmethod
    def update_request(self, request, check_version=False):
        """Write the request back (NotFoundError if it is gone, e.g. its requestor died)."""

    @abc.abstractmethod
    def delete_request(self, request_id):
        """Remove the request.  Missing is not an error."""

    @abc.abstractmethod
    def update_together(self, nodes=(), requests=(), release=(), delete_requests=()):
        """Compare-and-set writes of several nodes and requests as one: every record is
        written, or (NotFoundError / ConflictError naming the first record that failed) none
        is.  Bumps each record's ``version``.  ``release``: locks of ours released by the same
        write when it succeeds (one the store cannot release so is left held: release it as
        usual, which is a no-op for the others).  ``delete_requests``: request ids deleted
        after the writes (missing is not an error; a networked store may delete them just
        after, not in, the write).  A request fulfilled with its ready nodes, and the locks on
        them let go, are one write: a requestor never sees one without the other, and a
        networked store makes one round trip instead of one per record."""

    # -- locks -------------------------------------------------------------------------------------

    @abc.abstractmethod
    def lock(self, path, blocking=False, timeout=None, identifier=None):
        """Acquire the lock at ``path`` for our session and return a ``Lock``.

        Non-blocking by default: raises LockError at once if another session holds it.  With
        ``blocking`` waits up to ``timeout`` seconds (forever if None).  Also raises LockError if
        we already hold it (locks are not re-entrant)."""

    def try_locks(self, paths, identifier=None):
        """Try several locks without waiting: per path, a ``Lock``, or None where it is held
        (by another session, or already by us).  On any other error the locks taken are
        released and the error is raised.  A networked store sends every first attempt before
        it reads an answer (``_lock_start``/``_lock_finish``)."""
        started, failed = [], None
        for path in paths:
            try:
                started.append(self._lock_start(path, identifier))
            except LockError:
                started.append(None)
            except Exception as exc:      # e.g. not connected: nothing more is sent
                failed = exc
                break
        locks = []
        for attempt in started:
            lock = None
            if attempt is not None:
                try:
                    lock = self._lock_finish(attempt, False, None)
                except LockError:
                    pass
                except Exception as exc:  # the others' answers are still read (and released)
                    failed = failed or exc
            locks.append(lock)
        if failed is not None:
            for lock in locks:
                if lock is not None:
                    try:
                        lock.release()
                    except Exception:     # it ends with the session
                        pass
            raise failed
        return locks

    def _lock_start(self, path, identifier):
        """Begin taking a lock (a store that can, sends its first attempt here)."""
        return path, identifier

    def _lock_finish(self, attempt, blocking, timeout):
        """Finish what ``_lock_start`` began: the ``Lock``, or LockError as for ``lock``."""
        path, identifier = attempt
        return self.lock(path, blocking, timeout, identifier)

    @abc.abstractmethod
    def _release(self, lock):
        """Release a lock acquired by ``lock``.  Releasing a lock already lost is not an error."""

    def holds(self, lock):
        """True while ``lock`` still belongs to our current session: False once released or once
        the session that took it is gone.  Answered from memory, so it cannot see a loss the
        store has not noticed yet; writes that must not happen after such a loss are
        compare-and-set (``check_version``) as well."""
        return not lock.released

    @abc.abstractmethod
    def is_locked(self, path):
        """True if any session (including ours) holds the lock at ``path``."""

    # -- images ------------------------------------------------------------------------------------

    @abc.abstractmethod
    def create_build(self, build):
        """Store a new build of ``build.image``; assigns ``build.id`` (uuid4 hex) when unset."""

    @abc.abstractmethod
    def get_build(self, image, build_id):
        """The build, or None."""

    @abc.abstractmethod
    def list_builds(self, image=None):
        """Builds of one image (or all), oldest first."""

    @abc.abstractmethod
    def update_build(self, build, check_version=False):
        """Write the build back."""

    @abc.abstractmethod
    def delete_build(self, image, build_id):
        """Remove the build with all its upload records."""

    @abc.abstractmethod
    def create_upload(self, upload):
        """Store a new upload of (``image``, ``build_id``, ``provider``); assigns ``upload.id``
        (10-digit sequence within that build and provider)."""

    @abc.abstractmethod
    def restore_upload(self, upload):
        """Store an upload under its existing ``upload.id`` (``import-image-data``); ids that
        ``create_upload`` assigns later for that build and provider come after it.  Raises
        ``ConflictError`` if it exists and ``NotFoundError`` if its build does not."""

    @abc.abstractmethod
    def get_upload(self, image, build_id, provider, upload_id):
        """The upload, or None."""

    @abc.abstractmethod
    def list_uploads(self, image=None, build_id=None, provider=None):
        """Uploads matching the filters, oldest first."""

    @abc.abstractmethod
    def update_upload(self, upload, check_version=False):
        """Write the upload back."""

    @abc.abstractmethod
    def delete_upload(self, image, build_id, provider, upload_id):
        """Remove the upload record."""

    @abc.abstractmethod
    def list_image_names(self):
        """Names of every image that has any record (builds, pause flag, build request)."""

    @abc.abstractmethod
    def set_image_paused(self, image, paused):
        """Create or remove the image's pause flag."""

    @abc.abstractmethod
    def is_image_paused(self, image):
        """True if the image's pause flag exists."""

    @abc.abstractmethod
    def request_image_build(self, image):
        """Ask builders for a build of ``image`` now (idempotent)."""

    @abc.abstractmethod
    def get_image_build_request(self, image):
        """Creation time of the pending manual build request, or None."""

    @abc.abstractmethod
    def remove_image_build_request(self, image):
        """Clear the manual build request (missing is not an error)."""

    # -- components --------------------------------------------------------------------------------

    @abc.abstractmethod
    def register_component(self, component):
        """Register an ephemeral component record (``component.kind`` is ``launcher``, ``builder``
        or ``pool``); assigns ``component.id``.  Registrations survive a lost session: the store
        re-creates them in the new session."""

    @abc.abstractmethod
    def update_component(self, component):
        """Rewrite a registered component."""

    @abc.abstractmethod
    def unregister_component(self, component):
        """Remove a registration (missing is not an error)."""

    @abc.abstractmethod
    def list_components(self, kind=None):
        """Live registrations of ``kind`` (or all)."""

    # -- helpers shared by all implementations -----------------------------------------------------

    def lock_node(self, node_id, blocking=False, timeout=None, identifier=None):
        return self.lock(node_lock_path(node_id), blocking, timeout, identifier)

    def lock_request(self, request_id, blocking=False, timeout=None, identifier=None):
        return self.lock(request_lock_path(request_id), blocking, timeout, identifier)

    @contextlib.contextmanager
    def request_if_free(self, request_id):
        """The request as read under its lock, held for the ``with`` block; None when somebody
        else holds the lock (they are handling it) or the request is gone."""
        try:
            lock = self.lock_request(request_id)
        except LockError:
            yield None
            return
        with lock:
            yield self.get_request(request_id)

    def sync_nodes(self):
        """Make ``list_nodes`` include every node record committed (by anyone) before this
        call.  Stores that read the database directly need nothing; cached stores catch up.
        Used under a pool lock so two launchers never both fill the last slot of a pool."""

    def locked_node_ids(self):
        """Ids of nodes whose lock anyone holds.  Called every launcher loop: implementations
        should answer from one query or a cache; this default asks node by node."""
        return {n.id for n in self.list_nodes() if self.is_node_locked(n.id)}

    def locked_request_ids(self):
        """Ids of requests whose lock anyone holds (same caveat as ``locked_node_ids``)."""
        return {r.id for r in self.list_requests() if self.is_request_locked(r.id)}

    def remove_stale_request_locks(self, older_than):
        """Delete request lock directories left behind by requests that are gone, when nobody
        holds them and they are older than ``older_than`` seconds; return how many went.
        Request locks live beside the requests (a request znode may be ephemeral), so on
        ZooKeeper each finished request leaves an empty directory.  Stores whose locks vanish
        with their release have nothing to collect: this default."""
        return 0

    def remove_empty_nodes(self):
        """Delete node entries that hold no record, when nobody holds their lock; return how
        many went.  On ZooKeeper a client that locks a node just deleted (kazoo's lock recipe
        creates the lock's parents, as Zuul's does) brings the node's znode back empty, as
        Nodepool also finds.  Stores whose locks live apart from the records have none: this
        default."""
        return 0

    def is_node_locked(self, node_id):
        return self.is_locked(node_lock_path(node_id))

    def is_request_locked(self, request_id):
        return self.is_locked(request_lock_path(request_id))

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
