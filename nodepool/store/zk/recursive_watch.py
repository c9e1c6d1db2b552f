"""Persistent recursive watches (ZooKeeper >= 3.6 ``addWatch``) for kazoo 2.11.

kazoo 2.11 only knows one-shot data and child watches.  One persistent recursive watch on a root
tells us about every create, change and delete below it, so a cache costs one watch instead of
two per znode.  This module adds the ``addWatch`` request and routes its events to callbacks;
it does not re-send the watch after a reconnect: the caller re-adds it (idempotent on the server)
and re-walks its tree, because events may have been missed while disconnected.
"""
from collections import defaultdict, namedtuple

from kazoo.client import KazooClient
from kazoo.protocol.connection import ConnectionHandler
from kazoo.protocol.serialization import Watch, int_struct, write_string
from kazoo.protocol.states import EVENT_TYPE_MAP, WatchedEvent

ADD_WATCH_OPCODE = 106
MODE_PERSISTENT = 0
MODE_PERSISTENT_RECURSIVE = 1

_NODE_EVENTS = (1, 2, 3)  # created, deleted, data changed (recursive watches never send child events)


class AddWatch(namedtuple("AddWatch", "path mode")):
    """The jute ``AddWatchRequest``: path then mode; the reply has no body."""

    type = ADD_WATCH_OPCODE

    def serialize(self):
        out = bytearray(write_string(self.path))
        out.extend(int_struct.pack(self.mode))
        return out

    @classmethod
    def deserialize(cls, buffer, offset):
        return True


def _ancestors(path):
    """``/a/b/c`` -> ``/a/b/c``, ``/a/b``, ``/a``, ``/``."""
    yield path
    while path not in ("/", ""):
        path = path.rsplit("/", 1)[0] or "/"
        yield path


class _RecursiveWatchConnection(ConnectionHandler):
    def _read_watch_event(self, buffer, offset):
        client = self.client
        event, _ = Watch.deserialize(buffer, offset)
        if event.type in _NODE_EVENTS and not client._stopped.is_set():
            callbacks = []
            for prefix in _ancestors(event.path):
                callbacks.extend(client._recursive_watchers.get(prefix, ()))
            if callbacks:
                ev = WatchedEvent(EVENT_TYPE_MAP[event.type], client._state,
                                  client.unchroot(event.path))
                # called here, on the connection's thread, in order with the answers read
                # from the socket: no hop through kazoo's callback thread per event, and an
                # event is handed on before any answer the server sent after it
                for cb in callbacks:
                    try:
                        cb(ev)
                    except Exception:
                        self.logger.exception("recursive watch callback failed for %s", ev)
        # one-shot watches (kazoo's own) are rare next to the recursive ones: only look them
        # up, with a second parse, when one is set on this path
        if event.path in client._data_watchers or event.path in client._child_watchers:
            super()._read_watch_event(buffer, offset)


class RecursiveWatchClient(KazooClient):
    """A ``KazooClient`` with ``add_recursive_watch(path, callback)``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._recursive_watchers = defaultdict(set)
        old = self._connection
        self._connection = _RecursiveWatchConnection(
            self, old.retry_sleeper, logger=old.logger, sasl_options=old.sasl_options)

    def add_recursive_watch(self, path, callback):
        """Ask the server for a persistent recursive watch on ``path``; ``callback(WatchedEvent)``
        runs for every created/changed/deleted znode at or below it, until the session ends.
        It runs on the connection's thread, so it must only hand the event on (a queue), never
        block or call ZooKeeper.  Call again after every reconnect."""
        full = self.chroot + path if self.chroot else path
        full = full.rstrip("/") or "/"
        self._recursive_watchers[full].add(callback)
        result = self.handler.async_result()
        self._call(AddWatch(full, MODE_PERSISTENT_RECURSIVE), result)
        return result

    def remove_recursive_watch_callbacks(self):
        """Forget every callback (the server side ends with the session)."""
        self._recursive_watchers.clear()
