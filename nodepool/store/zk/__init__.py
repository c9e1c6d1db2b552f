"""Helpers of the ZooKeeper store: kazoo extensions and path layout."""
