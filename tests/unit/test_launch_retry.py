"""How long a failed launch attempt (or node delete) waits before the next: doubling while the
provider's launches (deletes) keep failing, back to the shortest wait once another launch on
it ended ready (another delete went through, after a transient error)."""
import logging
import time
from types import SimpleNamespace

from nodepool.errors import CloudError, TransientCloudError
from nodepool.launcher.provider_worker import DeleteJob, LaunchJob
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


class FailingDeletes(StubWorker):
    """A provider whose delete calls raise ``error``; the store is never reached."""

    def __init__(self, error):
        super().__init__()
        self.last_deleted_at = float("-inf")
        self.log = logging.getLogger("test")
        error_ = error

        class Machine:
            def advance(self):
                raise error_

        self.adapter = SimpleNamespace(delete_state_machine=lambda external_id: Machine())


def delete_fails(job):
    job.next_step = 0.0                               # due now
    assert job.step() is False
    return round(job.next_step - time.monotonic())


def make_delete(worker):
    return DeleteJob(Node(id="0000000002", provider="sim", external_id="i-1"), lock=None,
                     worker=worker, reason="used")


def test_a_delete_after_a_passing_error_waits_less_once_another_delete_went_through():
    worker = FailingDeletes(TransientCloudError("503 Service Unavailable"))
    job = make_delete(worker)
    assert [delete_fails(job) for _ in range(4)] == [1, 2, 4, 8]
    worker.last_deleted_at = time.monotonic()        # another node's delete went through
    assert [delete_fails(job) for _ in range(2)] == [1, 2]


def test_a_delete_that_keeps_failing_otherwise_keeps_doubling():
    worker = FailingDeletes(CloudError("403 Forbidden"))
    job = make_delete(worker)
    assert [delete_fails(job) for _ in range(3)] == [1, 2, 4]
    worker.last_deleted_at = time.monotonic()
    assert [delete_fails(job) for _ in range(2)] == [8, 16]


def test_a_delete_that_failed_that_often_keeps_doubling_whatever_else_goes_through():
    worker = FailingDeletes(TransientCloudError("503 Service Unavailable"))
    job = make_delete(worker)
    waits = []
    for _ in range(11):
        worker.last_deleted_at = time.monotonic()    # the cloud deletes others all along
        waits.append(delete_fails(job))
    assert waits == [1] * 8 + [2, 4, 8]
