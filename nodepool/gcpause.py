"""Pausing Python's cyclic garbage collector while a burst of long-lived objects is made.

Reading ten thousand records makes a few hundred thousand objects that all stay alive; the
collector, triggered every few hundred allocations, scans the growing young heap again and
again and finds nothing to free (a fifth of a walk's CPU).  Reference counting frees objects as
usual meanwhile; only the search for reference cycles waits until the burst is over.
"""
import contextlib
import gc


@contextlib.contextmanager
def collector_paused():
    """No cyclic collection inside the block (it resumes after, if it was on before)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()
