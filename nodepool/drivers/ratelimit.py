"""Provider API rate limiting.

One ``RateLimiter`` per provider, shared by every thread that calls that provider's API.  Each
``with limiter:`` block waits until at least ``1/rate`` seconds have passed since the previous
call started.  A rate of 0 or less means unlimited.  ``clock`` and ``sleep`` default to the real
monotonic clock; tests pass a fake pair to check the spacing exactly, without waiting.

Adapters enter it as ``with limiter.call(operation):``, which also counts the call in
``nodepool_api_calls_total{provider, operation}``: every API call passes here, so this is the one
place that counts them.
"""
import contextlib
import threading
import time


class RateLimiter:
    def __init__(self, name, rate, clock=time.monotonic, sleep=time.sleep):
        self.name = name
        self.clock = clock
        self.sleep = sleep
        self.interval = 1.0 / rate if rate and rate > 0 else 0.0
        self._lock = threading.Lock()
        self._next = 0.0
        self.calls = 0
        self.waited = 0.0

    def delay(self):
        """Seconds until the next call may start (0 if it may start now)."""
        with self._lock:
            return max(0.0, self._next - self.clock())

    def __enter__(self):
        with self._lock:
            now = self.clock()
            start = max(now, self._next)
            self._next = start + self.interval
            self.calls += 1
            wait = start - now
            self.waited += wait
        if wait > 0:
            self.sleep(wait)
        return self

    def __exit__(self, *exc):
        return False

    @contextlib.contextmanager
    def call(self, operation):
        """One API call named ``operation`` (e.g. ``create``, ``run_instances``,
        ``compute.create_server``): wait for its turn and count it."""
        with self:
            count_api_call(self.name, operation)
            yield self


def count_api_call(provider, operation):
    """Add one to ``nodepool_api_calls_total``; metrics must never break a cloud call.
    (``metrics`` is imported here, not with the module: loading a configuration imports the
    drivers, and ``nodepool list`` has no use for prometheus_client.)"""
    try:
        from .. import metrics
        metrics.API_CALLS.labels(provider, operation).inc()
    except Exception:
        pass
