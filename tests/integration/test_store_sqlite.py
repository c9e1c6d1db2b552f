"""SQLiteStore on a real file: the shared store contract, plus what only the embedded store does
(several processes on one file, PID-based session liveness, clear errors on bad files)."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from nodepool.errors import LockError, StoreError
from nodepool.model.records import Component, Node, NodeRequest
from nodepool.model.states import NodeState
from nodepool.store.base import node_lock_path
from nodepool.store.sqlite import SQLiteStore

from store_contract import StoreContract, eventually, new_node

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WAIT = 20.0


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "state" / "nodepool.sqlite")


@pytest.fixture
def make_store(db_path):
    stores = []

    def make(path=None, **kw):
        store = SQLiteStore(path or db_path, **kw)
        store.start()
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.stop()


class TestSQLiteStoreContract(StoreContract):
    @pytest.fixture
    def store_factory(self, make_store):
        """New started stores (separate sessions) on one fresh database file."""
        return make_store


# -- processes ---------------------------------------------------------------------------------

class Child:
    """A Python snippet run as a separate process against the store; talks by lines."""

    def __init__(self, code, *args):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})

    def line(self):
        text = self.proc.stdout.readline()
        if not text:
            raise AssertionError(f"child exited: {self.proc.wait()} {self.proc.stderr.read()}")
        return text.strip()

    def finish(self, timeout=WAIT):
        """Close stdin (the child's cue to stop cleanly) and wait for it."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(WAIT)

    def close(self):
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream and not stream.closed:
                stream.close()


@pytest.fixture
def children():
    started = []

    def start(code, *args):
        child = Child(code, *args)
        started.append(child)
        return child

    yield start
    for child in started:
        child.close()


LOCK_RACER = """
    import os, sys, time
    from nodepool.errors import LockError
    from nodepool.store.sqlite import SQLiteStore
    path, go = sys.argv[1], sys.argv[2]
    store = SQLiteStore(path).start()
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    try:
        store.lock("/nodepool/nodes/0000000001/lock")
        print("won", flush=True)
    except LockError:
        print("lost", flush=True)
    sys.stdin.read()
    store.stop()
"""


@pytest.mark.slow
def test_two_processes_race_for_one_lock_and_exactly_one_wins(db_path, tmp_path, children,
                                                              make_store):
    make_store()          # create the file first so both racers open an existing database
    go = tmp_path / "go"
    racers = [children(LOCK_RACER, db_path, go) for _ in range(2)]
    assert [r.line() for r in racers] == ["ready", "ready"]
    go.touch()
    results = sorted(r.line() for r in racers)
    assert results == ["lost", "won"]
    observer = make_store()
    assert observer.is_node_locked("0000000001")
    for r in racers:
        assert r.finish() == 0
    assert not observer.is_node_locked("0000000001")


HOLDER = """
    import sys
    from nodepool.model.records import NodeRequest
    from nodepool.store.sqlite import SQLiteStore
    store = SQLiteStore(sys.argv[1], session_timeout=float(sys.argv[2])).start()
    store.lock_node("0000000005")
    req = store.submit_request(NodeRequest(node_types=["small"]))
    print(req.id, flush=True)
    sys.stdin.read()
    store.stop()
"""


@pytest.mark.slow
def test_sigkilled_process_loses_its_lock_and_ephemeral_request(db_path, children, make_store):
    # A long session timeout: recovery must come from noticing the process is gone.
    observer = make_store(session_timeout=60)
    holder = children(HOLDER, db_path, 60)
    request_id = holder.line()
    assert observer.get_request(request_id) is not None
    assert observer.is_node_locked("0000000005")
    with pytest.raises(LockError):
        observer.lock_node("0000000005")
    holder.kill()
    lock = observer.lock_node("0000000005", blocking=True, timeout=WAIT)
    assert lock.path == node_lock_path("0000000005")
    eventually(lambda: observer.get_request(request_id) is None, timeout=WAIT,
               what="the dead process's ephemeral request to vanish")
    assert request_id not in [r.id for r in observer.list_requests()]


ALLOCATOR = """
    import json, os, sys, time
    from nodepool.model.records import Node, NodeRequest
    from nodepool.store.sqlite import SQLiteStore
    path, go = sys.argv[1], sys.argv[2]
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    store = SQLiteStore(path).start()       # all at once, on a file that does not exist yet
    nodes = [store.create_node(Node(state="ready", type=["x"])).id for _ in range(40)]
    reqs = [store.submit_request(NodeRequest(node_types=["x"]), ephemeral=False).id
            for _ in range(10)]
    print(json.dumps([nodes, reqs]), flush=True)
    store.stop()
"""


@pytest.mark.slow
def test_concurrent_allocation_from_four_processes_gives_unique_ids(db_path, tmp_path, children,
                                                                    make_store):
    go = tmp_path / "go"
    procs = [children(ALLOCATOR, db_path, go) for _ in range(4)]
    assert [p.line() for p in procs] == ["ready"] * 4
    go.touch()
    results = [json.loads(p.line()) for p in procs]
    for p in procs:
        assert p.finish() == 0
    store = make_store()
    node_ids = [i for nodes, _ in results for i in nodes]
    request_ids = [i for _, reqs in results for i in reqs]
    assert len(set(node_ids)) == 160
    assert len(set(request_ids)) == 40
    assert sorted(n.id for n in store.list_nodes()) == sorted(node_ids)
    assert sorted(r.id for r in store.list_requests()) == sorted(request_ids)
    for nodes, _ in results:       # each process saw its own ids grow
        assert nodes == sorted(nodes)


# -- bad files ---------------------------------------------------------------------------------

def one_line_naming(exc_info, path, *words):
    text = str(exc_info.value)
    assert "\n" not in text
    assert path in text
    for word in words:
        assert word in text.lower()


def test_missing_directory_is_created(tmp_path):
    path = tmp_path / "a" / "b" / "state.sqlite"
    with SQLiteStore(str(path)) as store:
        store.create_node(new_node())
    assert path.exists()


def test_corrupt_file_is_a_clear_error_and_stays_untouched(tmp_path):
    path = tmp_path / "state.sqlite"
    garbage = b"this is not a database, just some text\n" * 200
    path.write_bytes(garbage)
    with pytest.raises(StoreError) as exc_info:
        SQLiteStore(str(path)).start()
    one_line_naming(exc_info, str(path), "not a usable sqlite database")
    assert path.read_bytes() == garbage


def test_damaged_database_is_a_clear_error(tmp_path):
    path = tmp_path / "state.sqlite"
    with SQLiteStore(str(path)) as store:
        store.create_node(new_node())
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)        # wreck the schema page, keep the header
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError) as exc_info:
        SQLiteStore(str(path)).start()
    one_line_naming(exc_info, str(path))
    assert path.read_bytes() == bytes(data)


def test_path_under_a_file_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = str(blocker / "state.sqlite")
    with pytest.raises(StoreError) as exc_info:
        SQLiteStore(path).start()
    one_line_naming(exc_info, path, "directory")


def test_directory_as_path_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError) as exc_info:
        SQLiteStore(str(tmp_path)).start()
    one_line_naming(exc_info, str(tmp_path), "directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_file_is_a_clear_error(tmp_path):
    path = tmp_path / "state.sqlite"
    with SQLiteStore(str(path)):
        pass
    path.chmod(0o400)
    with pytest.raises(StoreError) as exc_info:
        SQLiteStore(str(path)).start()
    one_line_naming(exc_info, str(path))


LOCKER = """
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    sys.stdin.read()
    conn.execute("ROLLBACK")
    conn.close()
"""


@pytest.mark.slow
def test_database_locked_too_long_is_a_clear_error_and_data_survives(db_path, children):
    with SQLiteStore(db_path) as store:
        kept = store.create_node(new_node(comment="keep me"))
    writer = SQLiteStore(db_path, busy_timeout=0.3).start()
    try:
        locker = children(LOCKER, db_path)
        assert locker.line() == "locked"
        with pytest.raises(StoreError) as exc_info:
            SQLiteStore(db_path, busy_timeout=0.3).start()
        one_line_naming(exc_info, db_path, "locked")
        with pytest.raises(StoreError) as exc_info:
            writer.create_node(new_node())
        one_line_naming(exc_info, db_path, "locked")
        assert writer.get_node(kept.id).comment == "keep me"    # WAL readers still read
        assert locker.finish() == 0
        writer.create_node(new_node())
    finally:
        writer.stop()
    with SQLiteStore(db_path) as store:
        assert [n.comment for n in store.list_nodes()] == ["keep me", None]
    conn = sqlite3.connect(db_path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


# -- sessions ----------------------------------------------------------------------------------

def raw(db_path):
    return sqlite3.connect(db_path, isolation_level=None, timeout=10)


def test_wal_mode_and_sessions_rows(db_path, make_store):
    a, b = make_store(), make_store()
    conn = raw(db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = conn.execute("SELECT id, pid FROM sessions").fetchall()
    assert sorted(r[0] for r in rows) == sorted([a.session_id, b.session_id])
    assert {r[1] for r in rows} == {os.getpid()}
    a.stop()
    assert [r[0] for r in conn.execute("SELECT id FROM sessions")] == [b.session_id]
    conn.close()


def test_lock_of_a_reused_pid_session_is_free(db_path, make_store):
    """Our own PID with another process start time: that session's process is long dead."""
    store = make_store()
    conn = raw(db_path)
    conn.execute("INSERT INTO sessions (id, pid, pstart, hostname, heartbeat) "
                 "VALUES ('ghost', ?, 'not-our-start', ?, ?)",
                 (os.getpid(), store.hostname, time.time()))
    conn.execute("INSERT INTO locks VALUES (?, 'ghost', 'old', ?)",
                 (node_lock_path("0000000009"), time.time()))
    conn.close()
    assert not store.is_node_locked("0000000009")
    store.lock_node("0000000009").release()


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_session_of_another_host_lives_while_its_counter_moves(db_path, make_store):
    clock = FakeClock()
    store = make_store(session_timeout=5, clock=clock)
    conn = raw(db_path)
    conn.execute("INSERT INTO sessions (id, pid, pstart, hostname, heartbeat) "
                 "VALUES ('remote', 1, 'x', 'elsewhere', 0)")
    conn.execute("INSERT INTO locks VALUES (?, 'remote', NULL, ?)",
                 (node_lock_path("0000000001"), time.time()))
    assert store.is_node_locked("0000000001")
    with pytest.raises(LockError):
        store.lock_node("0000000001")
    for _ in range(3):                       # it beats: minutes of our time, still alive
        clock.now += 4
        conn.execute("UPDATE sessions SET beats=beats+1 WHERE id='remote'")
        assert store.is_node_locked("0000000001")
    clock.now += 4                           # silent, but not for a whole timeout yet
    assert store.is_node_locked("0000000001")
    clock.now += 2                           # silent for 6s > 5s: frozen or gone
    conn.close()
    assert not store.is_node_locked("0000000001")
    store.lock_node("0000000001").release()


class SteppedWallClock:
    """Stands in for the ``time`` module inside nodepool.store.sqlite: ``time()`` is the real
    wall clock plus ``offset`` (an NTP step or a resumed VM), everything else is the real one."""

    def __init__(self):
        self.offset = 0.0

    def time(self):
        return time.time() + self.offset

    def __getattr__(self, name):
        return getattr(time, name)


def test_wall_clock_steps_reap_no_session_and_lose_no_lock(db_path, make_store, monkeypatch):
    import nodepool.store.sqlite as sqlite_module
    wall = SteppedWallClock()
    monkeypatch.setattr(sqlite_module, "time", wall)
    a, b = make_store(session_timeout=3), make_store(session_timeout=3)
    lock = b.lock_node("0000000003")
    req = b.submit_request(NodeRequest(node_types=["small"]))
    comp = b.register_component(Component(kind="launcher"))
    sessions = {a.session_id, b.session_id}
    for step in (600, -1200, 3600, -3000):
        wall.offset += step
        for store in (a, b):                 # what every heartbeat and lock attempt does
            store._tx(store._beat)
            store._tx(store._reap)
            with pytest.raises(LockError):
                store.lock_node("0000000003")
    rows = raw(db_path).execute("SELECT id FROM sessions").fetchall()
    assert {r[0] for r in rows} == sessions
    assert a.is_node_locked("0000000003") and not lock.released
    assert a.get_request(req.id) is not None
    assert [c.id for c in a.list_components("launcher")] == [comp.id]


def test_file_made_before_the_beat_counter_is_upgraded(db_path):
    os.makedirs(os.path.dirname(db_path))
    conn = sqlite3.connect(db_path)
    conn.execute("CREATE TABLE sessions (id TEXT PRIMARY KEY, pid INTEGER, pstart TEXT, "
                 "hostname TEXT, heartbeat REAL)")
    conn.commit()
    conn.close()
    store = SQLiteStore(db_path).start()
    try:
        store.lock_node("0000000005").release()
        [(beats,)] = raw(db_path).execute("SELECT beats FROM sessions").fetchall()
        assert beats == 0
    finally:
        store.stop()


def test_frozen_session_is_reaped_after_its_counter_stood_still(db_path, make_store):
    clock = FakeClock()
    watcher = make_store(session_timeout=5, clock=clock)
    frozen = make_store(session_timeout=5)
    frozen.lock_node("0000000004")
    req = frozen.submit_request(NodeRequest(node_types=["small"]))
    frozen._stop.set()                       # its heartbeat thread stops; the process lives
    for thread in frozen._threads:
        thread.join(WAIT)
    watcher._tx(watcher._reap)               # first look: counter noted
    clock.now += 4.9
    watcher._tx(watcher._reap)
    assert watcher.is_node_locked("0000000004")
    clock.now += 0.2
    assert watcher._tx(watcher._reap) == {frozen.session_id}
    assert not watcher.is_node_locked("0000000004")
    assert watcher.get_request(req.id) is None
    watcher.lock_node("0000000004").release()


@pytest.mark.slow
def test_lost_session_is_replaced_and_components_reregistered(db_path, make_store):
    store = make_store(session_timeout=0.9)
    other = make_store()
    events = []
    store.add_session_listener(events.append)
    comp = store.register_component(Component(kind="launcher"))
    store.lock_node("0000000002")
    req = store.submit_request(NodeRequest(node_types=["small"]))
    old_session = store.session_id
    # What another process does to a session that missed its heartbeats (we were frozen):
    conn = raw(db_path)
    conn.execute("BEGIN IMMEDIATE")
    for table in ("locks", "requests", "components"):
        conn.execute(f"DELETE FROM {table} WHERE session=?", (old_session,))
    conn.execute("DELETE FROM sessions WHERE id=?", (old_session,))
    conn.execute("COMMIT")
    conn.close()
    eventually(lambda: events == ["lost", "connected"], timeout=WAIT, what="session replaced")
    assert store.session_id != old_session
    assert [c.id for c in other.list_components("launcher")] == [comp.id]
    assert other.get_request(req.id) is None
    assert not other.is_node_locked("0000000002")
    store.lock_node("0000000002").release()


def test_stop_and_start_again(db_path):
    store = SQLiteStore(db_path)
    store.start()
    first = store.session_id
    store.lock_node("0000000001")
    store.stop()
    store.start()
    try:
        assert store.session_id != first
        store.lock_node("0000000001").release()
        watcher = store.watch()
        other = SQLiteStore(db_path).start()
        other.create_node(new_node())
        other.stop()
        assert watcher.wait(WAIT)
    finally:
        store.stop()


# -- listing cache -----------------------------------------------------------------------------

def test_listing_reparses_only_changed_rows(db_path, make_store, monkeypatch):
    a, b = make_store(), make_store()
    nodes = [a.create_node(new_node()) for _ in range(30)]
    assert len(a.list_nodes()) == 30
    parsed = []
    original = Node.from_dict.__func__

    def counting(cls, data, id=None, version=None):
        parsed.append(id)
        return original(cls, data, id=id, version=version)
    monkeypatch.setattr(Node, "from_dict", classmethod(counting))
    assert len(a.list_nodes()) == 30
    assert parsed == []
    nodes[4].state = NodeState.USED
    b.update_node(nodes[4])
    b.delete_node(nodes[7].id)
    listed = a.list_nodes()
    assert parsed == [nodes[4].id]
    assert len(listed) == 29
    assert listed[4].state == NodeState.USED and listed[4].version == nodes[4].version


def test_watchers_only_poll_while_they_exist(make_store):
    store = make_store()
    watcher = store.watch()
    assert store._poller is not None and store._poller.is_alive()
    poller = store._poller
    del watcher
    poller.join(WAIT)
    assert not poller.is_alive()
    again = store.watch()
    other = make_store()
    other.create_node(new_node())
    assert again.wait(WAIT)


def test_a_write_right_after_watch_is_not_missed(make_store):
    # Long session timeouts: no heartbeat commit can stand in for the missed change.
    store, other = make_store(session_timeout=300), make_store(session_timeout=300)
    for _ in range(5):
        watcher = store.watch()
        other.create_node(new_node())
        assert watcher.wait(WAIT)
        del watcher


@pytest.mark.slow
def test_killed_but_unreaped_process_counts_as_gone(db_path, children, make_store):
    """A zombie (its parent has not waited for it yet) holds nothing any more."""
    observer = make_store(session_timeout=60)
    holder = children(HOLDER, db_path, 60)
    request_id = holder.line()
    os.kill(holder.proc.pid, signal.SIGKILL)        # no wait(): it stays a zombie meanwhile
    observer.lock_node("0000000005", blocking=True, timeout=WAIT)
    eventually(lambda: observer.get_request(request_id) is None, timeout=WAIT,
               what="the zombie's ephemeral request to vanish")


# -- wake-ups: a commit wakes the other processes' watchers at once ---------------------------------

def test_a_commit_wakes_another_process_watcher_without_polling(db_path, children, monkeypatch,
                                                                 make_store):
    """With the safety poll and the fallback poll an hour apart, only the wake-up can tell
    the watcher about a commit made by another process."""
    from nodepool.store import sqlite as sqlite_store
    monkeypatch.setattr(sqlite_store, "SAFETY_POLL", 3600.0)
    store = make_store(poll_interval=3600.0)
    watcher = store.watch()
    watcher.wait(0)
    child = children("""
        import sys
        from nodepool.model import Node
        from nodepool.store.sqlite import SQLiteStore
        store = SQLiteStore(sys.argv[1]).start()
        store.create_node(Node(type=["small"], provider="p"))
        print("written", flush=True)
        sys.stdin.read()
        store.stop()
    """, db_path)
    assert child.line() == "written"
    assert watcher.wait(WAIT), "the watcher was not woken by the other process's commit"
    assert [n.provider for n in store.list_nodes()] == ["p"]


def test_a_dead_watcher_name_is_removed_by_the_next_commit(db_path, make_store):
    store = make_store()
    watcher = store.watch()       # noqa: F841 (watchers are weakly held: keep it)
    wake_dir = db_path + ".wake"
    eventually(lambda: os.listdir(wake_dir), what="our wake-up name")
    stale = os.path.join(wake_dir, "nodepool-" + "0" * 32)     # a process killed with -9
    open(stale, "w").close()
    store.create_node(new_node())
    assert not os.path.exists(stale)
    assert len(os.listdir(wake_dir)) == 1                       # ours is still there
    store.stop()
    assert os.listdir(wake_dir) == []


def test_deletes_reach_other_caches_by_tombstones_and_without_them(db_path, make_store,
                                                                  monkeypatch):
    """Another process's deletes leave its cache through tombstones; a reader further behind
    than the tombstones kept (or rows deleted by a writer that left none) lists the ids."""
    from nodepool.store import sqlite as sqlite_store
    a, b = make_store(), make_store()
    nodes = [a.create_node(new_node()) for _ in range(6)]
    assert len(b.list_nodes()) == 6
    a.delete_node(nodes[0].id)
    assert {n.id for n in b.list_nodes()} == {n.id for n in nodes[1:]}
    # pruning: keep only a few generations of tombstones; b is now too far behind for them
    monkeypatch.setattr(sqlite_store, "TOMBSTONES_KEPT", 1)
    for node in nodes[1:4]:
        a.delete_node(node.id)
    assert raw(db_path).execute("SELECT count(*) FROM tombstones").fetchone()[0] < 4
    assert {n.id for n in b.list_nodes()} == {n.id for n in nodes[4:]}
    # a row gone with no tombstone at all (an older writer)
    raw(db_path).execute("DELETE FROM nodes WHERE id=?", (nodes[4].id,)).connection.commit()
    a.update_node(a.get_node(nodes[5].id))      # moves the generation
    assert [n.id for n in b.list_nodes()] == [nodes[5].id]
