"""RateLimiter: calls start at least 1/rate apart, across threads; 0 means unlimited."""
import threading
import time

import pytest

from nodepool.drivers.ratelimit import RateLimiter


class FakeClock:
    """A monotonic clock that only moves when the limiter sleeps (or the test says so)."""

    def __init__(self):
        self.now = 100.0
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def limiter(rate):
    clock = FakeClock()
    return RateLimiter("prov", rate, clock=clock, sleep=clock.sleep), clock


def test_back_to_back_calls_are_spaced_by_the_interval():
    lim, clock = limiter(rate=4)
    starts = []
    for _ in range(5):
        with lim:
            starts.append(clock())
    assert lim.calls == 5
    assert [b - a for a, b in zip(starts, starts[1:])] == [0.25] * 4
    assert clock.sleeps == [0.25] * 4
    assert lim.waited == pytest.approx(1.0)


def test_no_wait_when_the_caller_is_slower_than_the_rate():
    lim, clock = limiter(rate=2)
    for _ in range(3):
        with lim:
            pass
        clock.now += 0.6          # the caller's own work takes longer than the interval
    assert lim.calls == 3 and lim.waited == 0 and clock.sleeps == []


def test_partial_wait_only_for_the_rest_of_the_interval():
    lim, clock = limiter(rate=1)
    with lim:
        pass
    clock.now += 0.3
    assert lim.delay() == pytest.approx(0.7)
    with lim:
        pass
    assert clock.sleeps == [pytest.approx(0.7)]
    assert lim.delay() == pytest.approx(1.0)


@pytest.mark.parametrize("rate", [0, -1, None])
def test_zero_or_negative_rate_is_unlimited(rate):
    lim, clock = limiter(rate)
    for _ in range(100):
        with lim:
            pass
    assert lim.calls == 100 and lim.waited == 0 and clock.sleeps == []
    assert lim.delay() == 0


def test_an_error_inside_the_block_propagates_and_still_counts():
    lim, _ = limiter(rate=10)
    with pytest.raises(ValueError):
        with lim:
            raise ValueError("cloud said no")
    assert lim.calls == 1


def test_threads_sharing_a_limiter_never_start_faster_than_the_rate():
    """Real clock: the i-th call to start can never start before i intervals have passed
    (a lower bound the limiter guarantees, so this cannot flake on a busy machine)."""
    rate, threads, per_thread = 200, 4, 5
    lim = RateLimiter("prov", rate)
    starts, guard = [], threading.Lock()
    begin = time.monotonic()

    def caller():
        for _ in range(per_thread):
            with lim:
                with guard:
                    starts.append(time.monotonic())

    workers = [threading.Thread(target=caller) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert lim.calls == threads * per_thread == len(starts)
    for i, started in enumerate(sorted(starts)):
        assert started - begin >= i * lim.interval - 1e-6
    assert lim.waited > 0
