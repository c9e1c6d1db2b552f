"""kazoo's threading handler with a cheaper ``select``.

kazoo's default ``select`` builds an epoll instance, registers the descriptors, waits and closes
it again on every call, and its connection thread calls it several times per request: on a busy
launcher that was a tenth of the process's CPU.  ``poll(2)`` needs no kernel object of its own
and has no descriptor limit either.
"""
import select

from kazoo.handlers.threading import SequentialThreadingHandler
from kazoo.handlers.utils import fileobj_to_fd

_READ = select.POLLIN | select.POLLPRI
_WRITE = select.POLLOUT
_GONE = select.POLLERR | select.POLLHUP | select.POLLNVAL


class PollThreadingHandler(SequentialThreadingHandler):
    name = "poll_threading_handler"

    def select(self, rlist, wlist, xlist, timeout=None):
        if timeout is not None:
            if not isinstance(timeout, (int, float)):
                raise TypeError("timeout must be a number")
            if timeout < 0:
                raise ValueError("timeout must be non-negative")
        masks, objs = {}, {}
        for mask, fileobjs in ((_READ, rlist), (_WRITE, wlist)):
            for obj in fileobjs:
                fd = fileobj_to_fd(obj)
                masks[fd] = masks.get(fd, 0) | mask
                objs.setdefault(fd, []).append((mask, obj))
        poller = select.poll()
        for fd, mask in masks.items():
            poller.register(fd, mask)
        ready = poller.poll(None if timeout is None else timeout * 1000.0)
        readable, writable = [], []
        for fd, events in ready:
            for mask, obj in objs.get(fd, ()):
                # an error or hang-up shows as readable/writable: the next read or write
                # raises it, as with select(2)
                if events & (mask | _GONE):
                    (readable if mask == _READ else writable).append(obj)
        return readable, writable, []
