"""Fixtures of the fault tests: a ``FaultEnv`` on the embedded store or on ZooKeeper."""
import pytest

from faults.harness import make_env


@pytest.fixture(params=["sqlite", "zookeeper"])
def fault_env(request, tmp_path):
    """Daemons as processes on each store (ZooKeeper sessions time out after 2 s)."""
    env = make_env(request, tmp_path, request.param)
    yield env
    env.close()


@pytest.fixture
def zk_fault_env(request, tmp_path):
    env = make_env(request, tmp_path, "zookeeper")
    yield env
    env.close()


@pytest.fixture
def sqlite_fault_env(request, tmp_path):
    env = make_env(request, tmp_path, "sqlite")
    yield env
    env.close()
