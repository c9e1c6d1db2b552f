"""State stores: the embedded SQLite store and the ZooKeeper store, behind one interface."""
from ..extras import requires
from .base import (ChangeWatcher, Lock, StateStore, build_lock_path, image_build_lock_path,
                   node_lock_path, request_lock_path, upload_lock_path, upload_record_lock_path)


def open_store(config):
    """The store a configuration asks for (not started): ZooKeeper when ``zookeeper-servers``
    is set, else the embedded SQLite store at ``embedded-store.path``."""
    if config.zookeeper_servers:
        with requires("zookeeper", "the ZooKeeper state store (zookeeper-servers)"):
            from .zookeeper import ZooKeeperStore
        return ZooKeeperStore.from_config(config)
    from .sqlite import SQLiteStore
    return SQLiteStore(config.embedded_store.path,
                       session_timeout=config.embedded_store.session_timeout)


__all__ = ["ChangeWatcher", "Lock", "StateStore", "open_store", "build_lock_path",
           "image_build_lock_path", "node_lock_path", "request_lock_path", "upload_lock_path",
           "upload_record_lock_path"]
