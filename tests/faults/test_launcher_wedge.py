"""A deterministic reproduction of a launcher bug the ZooKeeper restart test found.

The node record of a launch is deleted (after a store outage the launcher's own cleanup may do
it; here the test does) while the launch's last attempt is failing.  Writing the failed node
then raises ``NotFoundError`` inside ``LaunchJob.step``'s error handler, which escapes ``step``:
the job is never removed and every provider worker iteration dies on it, so no other launch of
the provider progresses again.  In-process (a launcher thread), on the embedded store.
"""
import logging
import time

import pytest

from fixtures.launcher import LauncherEnv, wait_until
from nodepool.model import RequestState

pytestmark = pytest.mark.slow

CONFIG = """\
labels:
  - name: small
providers:
  - name: sim
    driver: simulated
    boot-time: 1.0
    launch-retries: 1
    cloud-images:
      - name: img
    pools:
      - name: main
        max-servers: 10
        labels:
          - name: small
            cloud-image: img
"""


def test_node_deleted_during_its_last_failing_attempt_does_not_wedge_the_worker(tmp_path,
                                                                               caplog):
    env = LauncherEnv(tmp_path)
    try:
        env.write(CONFIG)
        env.start_launcher()
        client = env.client()
        store = client.store
        client.submit(["small"])
        [doomed] = wait_until(lambda: [n for n in store.list_nodes() if n.external_id],
                              message="the instance being created")
        env.adapter("sim").cloud.update_instance(doomed.external_id, fails=True)
        store.delete_node(doomed.id)
        time.sleep(1.5)                      # its boot fails meanwhile: the attempt ends
        # another request must still be served by the worker
        req = client.submit(["small"])
        done = client.wait(req.id, timeout=20)
        assert done.state == RequestState.FULFILLED
        crashes = [r.getMessage() for r in caplog.records
                   if r.levelno >= logging.ERROR and "worker iteration failed" in r.getMessage()]
        assert crashes == []
    finally:
        env.close()
