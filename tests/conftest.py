"""Shared test setup.  Fixture modules live in tests/fixtures/ and are listed here."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

pytest_plugins = [
    "fixtures.launcher",
    "fixtures.zookeeper",
    "fixtures.status_data",
    "fixtures.sshd",
    "fixtures.openstack",
    "fixtures.moto",
    "fixtures.statsd",
    "fixtures.podman",
]
