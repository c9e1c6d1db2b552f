"""Cross-process wake-ups for the embedded store.

SQLite tells nobody about a commit, so a watcher used to ask (``PRAGMA data_version``) every
5 ms: a launcher with nothing to do spent a steady share of a core on it, and a new request
still waited up to a poll.  Here every watching process binds a Unix datagram socket in the
Linux abstract namespace and names it by an empty file in ``<database>.wake/``; each commit
sends one byte to every name listed there.  The watcher wakes at once and polls only as a
safety net (a writer that cannot see the directory, an older version of this program).

A process killed with ``kill -9`` leaves its file behind: sending to it is refused, and the
sender removes the file.  Anything that goes wrong here only costs latency, never a change:
the poll still finds it.
"""
import errno
import logging
import os
import socket
import uuid

log = logging.getLogger("nodepool.store.wakeups")

_OURS = set()        # names this process listens on: its own commits are told in-process


class Wakeups:
    def __init__(self, db_path):
        self.dir = db_path + ".wake"
        self._peers = ()
        self._listing_mtime = None
        self._sender = None
        self._own = None            # (socket, file) while we listen

    # -- the watching side -----------------------------------------------------------------------

    def listen(self):
        """A non-blocking socket that becomes readable when any process commits, or None where
        this cannot work (not Linux, a read-only directory): the caller polls then."""
        if not hasattr(socket, "AF_UNIX"):
            return None
        name = f"nodepool-{uuid.uuid4().hex}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(b"\0" + name.encode())
            sock.setblocking(False)
            os.makedirs(self.dir, exist_ok=True)
            path = os.path.join(self.dir, name)
            with open(path, "w"):
                pass
        except OSError as exc:
            sock.close()
            log.info("state store wake-ups unavailable (%s); watchers poll instead", exc)
            return None
        self._own = (sock, path)
        _OURS.add(name)
        return sock

    @staticmethod
    def drain(sock):
        try:
            while sock.recv(64):
                pass
        except OSError:
            pass

    def close(self, sock=None):
        """Stop listening (only if ``sock``, when given, is still the socket we listen on)."""
        if self._own is None or (sock is not None and self._own[0] is not sock):
            return
        sock, path = self._own
        self._own = None
        _OURS.discard(os.path.basename(path))
        sock.close()
        try:
            os.unlink(path)
        except OSError:
            pass

    # -- the committing side ---------------------------------------------------------------------

    def poke(self):
        """Wake every other watching process (after a commit; the store tells its own process's
        watchers directly).  Never raises."""
        try:
            mtime = os.stat(self.dir).st_mtime_ns
        except OSError:
            return                              # nobody watches (yet)
        if mtime != self._listing_mtime:
            try:
                self._peers = tuple(n for n in os.listdir(self.dir) if n.startswith("nodepool-"))
            except OSError:
                return
            self._listing_mtime = mtime
        if self._sender is None:
            try:
                self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sender.setblocking(False)
            except OSError:
                return
        for name in self._peers:
            if name in _OURS:
                continue                        # this process's watchers are told directly
            try:
                self._sender.sendto(b"!", b"\0" + name.encode())
            except BlockingIOError:
                pass                            # its queue is full: it is woken already
            except OSError as exc:
                if exc.errno == errno.ECONNREFUSED:     # its process is gone
                    try:
                        os.unlink(os.path.join(self.dir, name))
                    except OSError:
                        pass

    def wake_self(self):
        """Wake our own listener (its thread is stopping)."""
        own = self._own
        if own is None:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(b"!", b"\0" + os.path.basename(own[1]).encode())
        except OSError:
            pass

    def stop(self):
        self.close()
        if self._sender is not None:
            self._sender.close()
            self._sender = None
