"""Metastatic pieces without a store: external ids, and cleanup leaving kept nodes alone."""
from nodepool.drivers.base import KEPT_BY, kept_by
from nodepool.drivers.metastatic.adapter import external_id, parse_external_id
from nodepool.launcher.cleanup import DeleteNode, plan_node_cleanup
from nodepool.model import Node


def backing(user_data, state="in-use"):
    return Node(id="7", type=["big"], state=state, provider="sim", pool="main",
                state_time=1000.0, user_data=user_data)


def plan(nodes, configured):
    return plan_node_cleanup(nodes, [], set(), set(), {}, {"sim"}, 0, 2000.0, (), configured)


def test_external_ids_round_trip():
    assert external_id("0000000007", 2) == "0000000007-2"
    assert parse_external_id("0000000007-2") == ("0000000007", 2)
    assert parse_external_id("nonsense") is None and parse_external_id(None) is None


def test_cleanup_leaves_an_unlocked_kept_node_to_its_configured_keeper():
    kept = backing({KEPT_BY: "meta", "label": "big"})
    assert kept_by(kept) == "meta"
    assert plan([kept], {"sim", "meta"}) == []
    # keeper gone from the config: an ordinary unlocked in-use node
    assert plan([kept], {"sim"}) == [DeleteNode("7", "in-use and not locked by anyone")]
    # returned by its keeper (used): deleted as usual
    assert plan([backing({KEPT_BY: "meta"}, state="used")], {"sim", "meta"}) == [
        DeleteNode("7", "used")]
    # Zuul's own user_data (not a mapping, or without the key) changes nothing
    assert kept_by(backing("job-data")) is None
    assert plan([backing({"job": 1})], {"sim", "meta"}) == [
        DeleteNode("7", "in-use and not locked by anyone")]
