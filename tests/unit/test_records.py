"""Records and their state tables: JSON round trips, other programs' fields kept, legacy shapes
accepted, and legal/illegal state moves."""
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodepool.model.records import Component, ImageBuild, ImageUpload, Node, NodeRequest
from nodepool.model.states import (BUILD_TRANSITIONS, NODE_TRANSITIONS, REQUEST_TRANSITIONS,
                                   UPLOAD_TRANSITIONS, BuildState, IllegalTransition, NodeState,
                                   RequestState, UploadState, check_transition)

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40),
                         st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8)
unknown_keys = st.text(min_size=1, max_size=12).map(lambda k: "x_" + k)


def through_json(record):
    return json.loads(json.dumps(record.to_dict()))


# -- nodes -----------------------------------------------------------------------------------------

def test_node_to_dict_has_every_known_key_and_no_bookkeeping():
    node = Node()
    node.id, node.version = "0000000001", 7
    d = node.to_dict()
    for key in ("state", "state_time", "provider", "pool", "type", "allocated_to", "launcher",
                "external_id", "hostname", "interface_ip", "host_keys", "username",
                "connection_type", "connection_port", "hold_expiration", "resources",
                "attributes", "tenant_name", "driver_data", "requestor", "node_properties"):
        assert key in d, key
    assert d["state"] == "init"
    assert d["username"] == "zuul"
    assert d["provider"] is None
    assert "id" not in d and "version" not in d and "extra" not in d


def test_node_round_trip_through_json():
    node = Node(state=NodeState.READY, provider="p1", pool="main", type=["small", "alt"],
                interface_ip="10.0.0.5", host_keys=["ssh-ed25519 AAA"], resources={"cores": 2},
                attributes={"az": "a"}, connection_port=2222, external_id="i-1")
    back = Node.from_dict(through_json(node), id="0000000003", version=2)
    assert back.to_dict() == node.to_dict()
    assert back.state is NodeState.READY
    assert (back.id, back.version) == ("0000000003", 2)
    assert back.to_dict()["ssh_port"] == 2222


def test_node_keeps_unknown_fields_in_extra_and_writes_them_back():
    data = {"state": "ready", "type": ["x"], "zuul_private": {"a": [1, 2]}, "newer": True}
    node = Node.from_dict(data)
    assert node.extra == {"zuul_private": {"a": [1, 2]}, "newer": True}
    out = node.to_dict()
    assert out["zuul_private"] == {"a": [1, 2]} and out["newer"] is True
    assert data == {"state": "ready", "type": ["x"], "zuul_private": {"a": [1, 2]},
                    "newer": True}                   # the input is not consumed


def test_node_legacy_string_type_becomes_a_list():
    assert Node.from_dict({"type": "ubuntu-small"}).type == ["ubuntu-small"]
    assert Node.from_dict({"type": None}).type == []
    assert Node.from_dict({"type": "ubuntu-small"}).labels == ["ubuntu-small"]


def test_node_nulls_from_other_writers_get_defaults():
    node = Node.from_dict({"username": None, "host_keys": None, "node_properties": None,
                           "connection_port": None, "ssh_port": 2022})
    assert node.username == "zuul"
    assert node.host_keys == [] and node.node_properties == []
    assert node.connection_port == 2022


def test_node_state_unknown_to_us_is_kept_verbatim():
    node = Node.from_dict({"state": "some-future-state"})
    assert node.state == "some-future-state"
    assert node.to_dict()["state"] == "some-future-state"


def test_empty_dict_gives_defaults():
    assert Node.from_dict({}).state is NodeState.INIT
    assert Node.from_dict(None).type == []
    assert NodeRequest.from_dict({}).state is RequestState.REQUESTED


@given(extra=st.dictionaries(unknown_keys, json_values, max_size=4),
       labels=st.lists(st.text(min_size=1, max_size=6), max_size=3),
       comment=st.one_of(st.none(), st.text(max_size=10)))
def test_node_json_round_trip_is_lossless(extra, labels, comment):
    data = {**Node(type=labels, comment=comment).to_dict(), **extra}
    node = Node.from_dict(json.loads(json.dumps(data)))
    assert node.to_dict() == data
    assert node.extra == extra


def test_copy_shares_no_lists_or_dicts():
    node = Node(type=["a"], host_keys=["k"], resources={"cores": 1})
    node.id, node.version = "0000000004", 3
    node.extra = {"other": 1}
    dup = node.copy()
    dup.type.append("b")
    dup.host_keys.append("k2")
    dup.resources["ram"] = 1
    dup.extra["more"] = 2
    assert node.type == ["a"] and node.host_keys == ["k"]
    assert node.resources == {"cores": 1} and node.extra == {"other": 1}
    assert (dup.id, dup.version) == ("0000000004", 3)


# -- node requests ---------------------------------------------------------------------------------

def test_request_round_trip_and_unknown_fields():
    req = NodeRequest(node_types=["a", "b"], requestor="zuul", relative_priority=3,
                      declined_by=["p1-main"], event_id="e1", requestor_data={"job": "x"})
    data = {**through_json(req), "zuul_only": [1]}
    back = NodeRequest.from_dict(data, id="100-0000000012", version=0)
    assert back.to_dict() == data
    assert back.extra == {"zuul_only": [1]}
    assert back.state is RequestState.REQUESTED


def test_request_nulls_get_defaults():
    req = NodeRequest.from_dict({"declined_by": None, "nodes": None, "node_types": None,
                                 "reuse": None, "relative_priority": None})
    assert (req.declined_by, req.nodes, req.node_types) == ([], [], [])
    assert req.reuse is True and req.relative_priority == 0


def test_request_priority_sequence_and_handling_order():
    def req(rid, rel=0):
        r = NodeRequest(relative_priority=rel)
        r.id = rid
        return r
    a = req("100-0000000005")
    assert (a.priority, a.sequence) == ("100", "0000000005")
    unnumbered = req(None)
    assert unnumbered.priority == "100" and unnumbered.sequence == ""
    reqs = [req("200-0000000001"), req("100-0000000009"), req("100-0000000004", rel=2),
            req("100-0000000007"), req("050-0000000010")]
    ordered = [r.id for r in sorted(reqs, key=NodeRequest.sort_key)]
    assert ordered == ["050-0000000010", "100-0000000007", "100-0000000009",
                       "100-0000000004", "200-0000000001"]


# -- images ----------------------------------------------------------------------------------------

def test_build_json_leaves_out_bookkeeping_and_empty_formats():
    build = ImageBuild(image="ubuntu", builder="b1", state=BuildState.READY)
    build.id = "abc"
    d = build.to_dict()
    assert "image" not in d and "id" not in d and "formats" not in d
    assert d["state"] == "ready" and d["builder"] == "b1"
    build.formats = "qcow2,raw"
    assert build.to_dict()["formats"] == "qcow2,raw"
    assert build.format_list == ["qcow2", "raw"]
    assert ImageBuild().format_list == []


def test_build_and_upload_round_trips():
    build = ImageBuild(formats="raw", username="root", extra={"dib": 1})
    assert ImageBuild.from_dict(through_json(build)).to_dict() == build.to_dict()
    up = ImageUpload(state=UploadState.READY, external_id="ami-1", external_name="ubuntu-1",
                     format="raw")
    back = ImageUpload.from_dict(through_json(up), id="0000000001", version=1)
    assert back.to_dict() == up.to_dict()
    assert back.state is UploadState.READY
    for key in ("image", "build_id", "provider", "id"):
        assert key not in back.to_dict()


def test_upload_path_is_nodepools_image_id():
    up = ImageUpload(image="ubuntu", build_id="b1", provider="p1")
    up.id = "0000000002"
    assert up.path == "/nodepool/images/ubuntu/builds/b1/providers/p1/images/0000000002"


# -- components ------------------------------------------------------------------------------------

def test_component_json_keys_match_nodepool():
    pool = Component(kind="pool", hostname="h", version_string="11.0", name="main",
                     provider_name="p1", supported_labels=["a"], priority=50,
                     pool_id="h-PoolWorker.p1-main")
    pool.version = 4                      # our compare-and-set counter, not the JSON "version"
    d = pool.to_dict()
    assert d["version"] == "11.0" and d["id"] == "h-PoolWorker.p1-main"
    assert d["kind"] == "pool" and d["supported_labels"] == ["a"]
    back = Component.from_dict(json.loads(json.dumps(d)), id="h0000000001", version=9)
    assert (back.version_string, back.pool_id, back.kind) == ("11.0", "h-PoolWorker.p1-main",
                                                              "pool")
    assert (back.id, back.version) == ("h0000000001", 9)
    assert back.to_dict() == d


def test_non_pool_components_carry_no_pool_keys():
    d = Component(kind="launcher", hostname="h", name="ignored").to_dict()
    assert d["kind"] == "launcher"
    for key in ("name", "provider_name", "supported_labels", "priority", "paused", "id"):
        assert key not in d


# -- states ----------------------------------------------------------------------------------------

def test_state_values_are_nodepools_strings():
    assert NodeState.IN_USE == "in-use" and str(NodeState.IN_USE) == "in-use"
    assert {s.value for s in RequestState} == {"requested", "pending", "fulfilled", "failed"}
    assert json.dumps({"s": NodeState.READY}) == '{"s": "ready"}'


@pytest.mark.parametrize("table", [NODE_TRANSITIONS, REQUEST_TRANSITIONS, BUILD_TRANSITIONS,
                                   UPLOAD_TRANSITIONS])
def test_every_state_has_a_row_in_its_table(table):
    kind = type(next(iter(table)))
    assert set(table) == set(kind)
    for targets in table.values():
        assert all(isinstance(t, kind) for t in targets)


def test_set_state_follows_the_table_and_stamps_time():
    node = Node(state=NodeState.BUILDING)
    node.set_state(NodeState.READY, when=100.0)
    assert node.state is NodeState.READY and node.state_time == 100.0
    node.set_state("in-use")
    assert node.state is NodeState.IN_USE and node.state_time > 100.0
    with pytest.raises(IllegalTransition, match="in-use to building"):
        node.set_state(NodeState.BUILDING)
    assert node.state is NodeState.IN_USE


@pytest.mark.parametrize("record, old, new", [
    (Node, NodeState.DELETED, NodeState.READY),
    (Node, NodeState.FAILED, NodeState.READY),
    (NodeRequest, RequestState.FAILED, RequestState.PENDING),
    (ImageBuild, BuildState.READY, BuildState.BUILDING),
    (ImageUpload, UploadState.FAILED, UploadState.READY),
])
def test_illegal_moves_are_refused_where_they_happen(record, old, new):
    rec = record(state=old)
    with pytest.raises(IllegalTransition):
        rec.set_state(new)
    assert rec.state == old


def test_check_transition_does_not_judge_creation_or_unknown_states():
    check_transition(None, NodeState.DELETED)
    check_transition("state-from-the-future", NodeState.READY)
    check_transition(NodeState.READY, NodeState.READY)
    with pytest.raises(IllegalTransition):
        check_transition("deleted", NodeState.READY)


def test_unknown_state_string_is_refused_by_set_state():
    with pytest.raises(ValueError):
        Node().set_state("exploded")


@given(old=st.sampled_from(list(NodeState)), new=st.sampled_from(list(NodeState)))
def test_node_set_state_agrees_with_the_table(old, new):
    node = Node(state=old)
    allowed = old == new or new in NODE_TRANSITIONS[old]
    if allowed:
        node.set_state(new, when=1.0)
        assert node.state is new
    else:
        with pytest.raises(IllegalTransition):
            node.set_state(new)
        assert node.state is old
