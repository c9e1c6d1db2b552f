"""On every fault-test daemon's PYTHONPATH: stack dumps on demand, and a wall clock to step.

``SIGUSR1`` writes the stack of every thread to stderr (the daemon's log) and lets the daemon run
on (``FaultEnv.show_stacks``), so a stall is seen from the inside while it lasts.

With ``NODEPOOL_CLOCK_OFFSET_FILE`` set (the clock-step test), ``time.time()`` and ``time.time_ns()`` return the real time plus the offset in seconds written in
the file ``$NODEPOOL_CLOCK_OFFSET_FILE`` (re-read at most every 0.1 s).  The monotonic clocks are
left alone, as an NTP step leaves them, and so is the simulated cloud's code: the cloud it models
keeps its own, right, clock.  (libfaketime would do this below Python, but Debian's
0.9.10 breaks ``time.sleep`` of Python 3.11: EINVAL with a real monotonic clock, a hang
without, see wolfcw/libfaketime#426.)
"""
import faulthandler
import os
import signal
import sys
import time

faulthandler.register(signal.SIGUSR1, all_threads=True)

# callers in these modules see the true time (the simulated cloud is not on this host)
_TRUE_TIME_MODULES = ("nodepool.drivers.simulated",)

_PATH = os.environ.get("NODEPOOL_CLOCK_OFFSET_FILE")

if _PATH:
    _real_time, _real_time_ns, _monotonic = time.time, time.time_ns, time.monotonic
    _cached = {"offset": 0.0, "read_at": float("-inf")}

    def _offset():
        now = _monotonic()
        if now - _cached["read_at"] >= 0.1:
            _cached["read_at"] = now
            try:
                with open(_PATH) as f:
                    _cached["offset"] = float(f.read().strip() or 0)
            except (OSError, ValueError):
                pass
        return _cached["offset"]

    def _stepped():
        caller = sys._getframe(2).f_globals.get("__name__", "")
        return 0.0 if caller.startswith(_TRUE_TIME_MODULES) else _offset()

    def _stepped_time():
        return _real_time() + _stepped()

    def _stepped_time_ns():
        return _real_time_ns() + int(_stepped() * 1e9)

    time.time = _stepped_time
    time.time_ns = _stepped_time_ns
