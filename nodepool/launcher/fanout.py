"""Independent store work of one pass, carried out side by side.

On ZooKeeper every lock and write is a network round trip, and the launcher's loop used to make
them one after the other: a pass that served twenty waiting requests waited for a few hundred
round trips in a row, and that, not CPU, capped requests per second.  The items handed here are
independent (each request and node is locked on its own, and each item's errors are its own),
so a few threads carry them at once.  The pass still goes on only when every item is done, so
what one pass decides and sees is unchanged.  A store that gains nothing from it (the embedded
store serialises its writes) says so (``StateStore.parallel_writes``) and the items run in line.
"""
import logging
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("nodepool.launcher.fanout")

WORKERS = 8


class Fanout:
    def __init__(self, workers=1):
        self._pool = (ThreadPoolExecutor(workers, thread_name_prefix="pass-io")
                      if workers > 1 else None)

    @classmethod
    def for_store(cls, store):
        return cls(WORKERS if getattr(store, "parallel_writes", False) else 1)

    def run(self, fn, items):
        """``fn(item)`` for every item, side by side where that helps; returns when all are
        done.  ``fn`` deals with its own errors: one that escapes is logged, never raised."""
        items = list(items)
        if self._pool is None or len(items) < 2:
            for item in items:
                self._one(fn, item)
            return
        for future in [self._pool.submit(self._one, fn, item) for item in items]:
            future.result()

    @staticmethod
    def _one(fn, item):
        try:
            fn(item)
        except Exception:       # noqa: BLE001 - one item must not end the others or the pass
            log.exception("pass item %r failed", item)

    def stop(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True)
