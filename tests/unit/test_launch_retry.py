"""How long a failed launch attempt waits before the next: doubling while the provider's
launches keep failing, back to the shortest wait once another launch on it ended ready."""
import time
from types import SimpleNamespace

from nodepool.errors import TransientCloudError
from nodepool.launcher.provider_worker import LaunchJob
from nodepool.model.records import Node


class StubWorker:
    """What a launch job asks of its provider worker when an attempt fails."""

    def __init__(self):
        self.last_ready_at = float("-inf")
        self.adapter = None

    def _count_launch(self, *args):
        pass

    def on_outcome(self, *args):
        pass


def make_job(worker):
    provider = SimpleNamespace(name="sim", launch_retries=20)
    pool = SimpleNamespace(name="main", labels={})
    return LaunchJob(Node(id="0000000001", type=["small"]), lock=None, spec=None,
                     provider=provider, pool=pool, worker=worker)


def fail(job):
    """One failed create; the wait it was given (seconds)."""
    job._fail_attempt(TransientCloudError("503 Service Unavailable"))
    return round(job.next_step - time.monotonic())


def test_waits_double_while_no_launch_on_the_provider_succeeds():
    job = make_job(StubWorker())
    assert [fail(job) for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert job.attempt == 9


def test_a_launch_ended_ready_elsewhere_brings_the_wait_back_to_the_shortest():
    worker = StubWorker()
    job = make_job(worker)
    assert [fail(job) for _ in range(4)] == [1, 2, 4, 8]
    worker.last_ready_at = time.monotonic()          # another node of the provider is ready
    assert [fail(job) for _ in range(3)] == [1, 2, 4]
    worker.last_ready_at = time.monotonic()
    assert fail(job) == 1


def test_a_ready_launch_before_the_last_failure_does_not_count():
    worker = StubWorker()
    job = make_job(worker)
    fail(job)
    worker.last_ready_at = time.monotonic()
    fail(job)                                        # counts the ready above: back to 1 s
    assert [fail(job) for _ in range(2)] == [2, 4]   # nothing ready since: doubling again
