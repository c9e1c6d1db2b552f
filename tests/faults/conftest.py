"""Fixtures of the fault tests: a ``FaultEnv`` on the embedded store or on ZooKeeper."""
import pytest

from faults.harness import FaultEnv


def zookeeper_store_yaml(server, chroot, timeout):
    host, port = server.hosts.rsplit(":", 1)
    return (f"zookeeper-servers:\n  - host: {host}\n    port: {port}\n    chroot: {chroot}\n"
            f"zookeeper-timeout: {timeout}\n")


def make_env(request, tmp_path, kind, zk_timeout=2.0):
    store_yaml = None
    if kind == "zookeeper":
        server = request.getfixturevalue("zookeeper_server")
        store_yaml = zookeeper_store_yaml(server, request.getfixturevalue("zk_chroot"),
                                          zk_timeout)
    return FaultEnv(tmp_path, store_yaml)


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
