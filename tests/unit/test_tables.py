"""Listing tables shared by the CLI and the web app: columns, JSON keys, cell formatting."""
import json

import pytest

from nodepool.cli import tables
from nodepool.model.records import Component, ImageBuild, ImageUpload, Node, NodeRequest
from nodepool.web.app import wants_json

NOW = 1_700_000_000.0


def headings(text):
    return [h.strip() for h in text.splitlines()[1].strip("|").split("|")]


def cells(text, line=3):
    return [c.strip() for c in text.splitlines()[line].strip("|").split("|")]


def make_node(**kw):
    defaults = dict(state="ready", state_time=NOW - 90061, provider="sim", pool="main",
                    type=["small", "big"], external_id="i-1", public_ipv4="192.0.2.1",
                    public_ipv6="2001:db8::1", hostname="np0000000001")
    defaults.update(kw)
    node = Node(**defaults)
    node.id = kw.get("id", "0000000001")
    return node


@pytest.mark.parametrize("seconds,text", [
    (0, "00:00:00:00"), (59, "00:00:00:59"), (61, "00:00:01:01"), (3600, "00:01:00:00"),
    (90061, "01:01:01:01"), (-5, "00:00:00:00"), (100 * 86400, "100:00:00:00"),
])
def test_format_age(seconds, text):
    assert tables.format_age(seconds) == text


def test_port_that_is_not_an_integer_is_redacted():
    assert tables.format_port(22) == "22"
    assert tables.format_port("secret-port") == "redacted"
    assert tables.format_port({"port": 1}) == "redacted"
    assert tables.format_port(True) == "redacted"


def test_node_list_columns_and_cells():
    rows = tables.node_rows([make_node()], {"0000000001"}, NOW)
    text = tables.render_text(tables.NODE_LIST, rows, NOW)
    assert headings(text) == ["ID", "Provider", "Label", "Server ID", "Public IPv4", "IPv6",
                              "State", "Age", "Locked"]
    assert cells(text) == ["0000000001", "sim", "small,big", "i-1", "192.0.2.1", "2001:db8::1",
                           "ready", "01:01:01:01", "locked"]


def test_node_list_is_left_aligned():
    rows = tables.node_rows([make_node(provider="p")], set(), NOW)
    line = tables.render_text(tables.NODE_LIST, rows, NOW).splitlines()[3]
    assert "| p        |" in line


def test_node_list_detail_adds_columns_and_redacts_port():
    node = make_node(connection_port="from-secret", comment="broken disk", az="az1",
                     allocated_to="100-0000000007", username="zuul", launcher="host-a")
    rows = tables.node_rows([node], set(), NOW, detail=True)
    text = tables.render_text(tables.NODE_LIST_DETAIL, rows, NOW)
    assert headings(text)[9:] == ["Pool", "Hostname", "Private IPv4", "AZ", "Username", "Port",
                                  "Launcher", "Allocated To", "Hold Job", "Comment", "User Data",
                                  "Driver Data"]
    row = dict(zip(headings(text), cells(text)))
    assert row["Port"] == "redacted"
    assert row["Locked"] == "unlocked"
    assert row["AZ"] == "az1"
    assert row["Comment"] == "broken disk"


def test_node_json_keys_and_values():
    rows = tables.node_rows([make_node(connection_port=2222)], set(), NOW, detail=True)
    data = json.loads(tables.render_json(tables.NODE_LIST_DETAIL, rows))
    assert list(data[0]) == tables.NODE_LIST_DETAIL.keys
    assert data[0]["label"] == ["small", "big"]
    assert data[0]["age"] == "01:01:01:01"     # node-list JSON carries the formatted age
    assert data[0]["ipv6"] == "2001:db8::1"
    assert data[0]["server_id"] == "i-1"
    assert data[0]["connection_port"] == 2222


def test_fields_select_columns_by_key_or_heading():
    rows = tables.node_rows([make_node()], set(), NOW)
    text = tables.render_text(tables.NODE_LIST, rows, NOW, fields=["state", "ID"])
    assert headings(text) == ["State", "ID"]
    with pytest.raises(ValueError, match="unknown field.*bogus"):
        tables.render_text(tables.NODE_LIST, rows, NOW, fields=["bogus"])


def make_upload(upload_id, build_id="b1", provider="sim", state="ready", age=3600, **kw):
    u = ImageUpload(state=state, state_time=NOW - age, external_id=f"img-{upload_id}",
                    external_name=f"debian-{upload_id}", image="debian", build_id=build_id,
                    provider=provider, **kw)
    u.id = upload_id
    return u


def test_image_list_columns_and_epoch_age():
    rows = tables.upload_rows([make_upload("0000000001", age=86400 + 60)])
    text = tables.render_text(tables.IMAGE_LIST, rows, NOW)
    assert headings(text) == ["Build ID", "Upload ID", "Provider", "Image",
                              "Provider Image Name", "Provider Image ID", "State", "Age"]
    assert cells(text) == ["b1", "0000000001", "sim", "debian", "debian-0000000001",
                           "img-0000000001", "ready", "01:00:01:00"]
    data = json.loads(tables.render_json(tables.IMAGE_LIST, rows))
    assert data[0]["age"] == int(NOW - 86400 - 60)   # image-list JSON keeps the epoch


def test_legacy_image_list_marks_newest_ready_upload_current():
    uploads = [
        make_upload("0000000001", build_id="old", age=7200),
        make_upload("0000000002", build_id="new", age=1800),
        make_upload("0000000003", build_id="newer", state="uploading", age=60),
        make_upload("0000000004", build_id="old", provider="other", age=5400),
    ]
    rows = tables.legacy_upload_rows(uploads, NOW)
    text = tables.render_text(tables.LEGACY_IMAGE_LIST, rows, NOW)
    assert headings(text) == ["ID", "Provider", "Image", "Hostname", "Version", "Image ID",
                              "Server ID", "State", "Age (hours)"]
    by_id = {c[0]: c for c in (cells(text, i) for i in range(3, 7))}
    assert by_id["0000000001"][7] == "ready"
    assert by_id["0000000002"][7] == "current"
    assert by_id["0000000003"][7] == "uploading"
    assert by_id["0000000004"][7] == "current"
    assert by_id["0000000001"][8] == "2.00"
    assert by_id["0000000002"][8] == "0.50"
    assert by_id["0000000004"][8] == "1.50"
    assert by_id["0000000002"][3:5] == ["debian-0000000002", "new"]


def test_dib_image_list_shows_paused_images():
    b1 = ImageBuild(state="ready", state_time=NOW - 60, builder="builder-1",
                    formats="qcow2,raw", image="debian")
    b1.id = "abc"
    b2 = ImageBuild(state="building", state_time=NOW - 30, builder="builder-1", image="fedora")
    b2.id = "def"
    rows = tables.build_rows([b1, b2], paused_images={"fedora"})
    text = tables.render_text(tables.DIB_IMAGE_LIST, rows, NOW)
    assert headings(text) == ["ID", "Image", "Builder", "Formats", "State", "Age"]
    assert cells(text) == ["debian-abc", "debian", "builder-1", "qcow2,raw", "ready",
                           "00:00:01:00"]
    assert cells(text, 4)[4] == "paused"


def test_image_status_build_request_states():
    building = ImageBuild(state="building", image="fedora")
    rows = tables.image_status_rows(
        ["debian", "fedora", "centos"], paused_images={"centos"},
        build_requests={"debian": NOW - 120, "fedora": NOW - 5}, builds=[building])
    text = tables.render_text(tables.IMAGE_STATUS, rows, NOW)
    assert headings(text) == ["Image", "Paused", "Build Request", "Build Request Age"]
    assert cells(text, 3) == ["centos", "True", "", ""]
    assert cells(text, 4) == ["debian", "False", "pending", "00:00:02:00"]
    assert cells(text, 5)[2] == "building"


def test_request_list_columns():
    req = NodeRequest(state="pending", node_types=["small", "big"], nodes=["0000000001"],
                      declined_by=["host-PoolWorker.a-main-x"], requestor="zuul",
                      relative_priority=3, event_id="e1")
    req.id = "100-0000000005"
    rows = tables.request_rows([req])
    text = tables.render_text(tables.REQUEST_LIST, rows, NOW)
    assert headings(text) == ["Request ID", "Priority", "State", "Requestor", "Node Types",
                              "Nodes", "Declined By", "Event ID"]
    assert cells(text) == ["100-0000000005", "3", "pending", "zuul", "small,big", "0000000001",
                           "host-PoolWorker.a-main-x", "e1"]
    data = json.loads(tables.render_json(tables.REQUEST_LIST, rows))
    assert data[0]["node_types"] == ["small", "big"]


def test_label_list_is_union_of_pool_components():
    comps = [Component(kind="pool", supported_labels=["b", "a"]),
             Component(kind="pool", supported_labels=["a", "c"]),
             Component(kind="launcher")]
    assert tables.label_rows(comps) == [{"label": "a"}, {"label": "b"}, {"label": "c"}]


def test_info_rows_group_uploads_by_build():
    uploads = [make_upload("0000000001", build_id="b1"), make_upload("0000000002", build_id="b1"),
               make_upload("0000000001", build_id="b2")]
    rows = tables.info_image_rows(uploads)
    assert rows == [
        {"image": "debian", "build_id": "b1", "upload_ids": ["0000000001", "0000000002"]},
        {"image": "debian", "build_id": "b2", "upload_ids": ["0000000001"]},
    ]


@pytest.mark.parametrize("accept,expected", [
    (None, False), ("*/*", False), ("application/json", True), ("text/plain", False),
    ("application/json, text/plain;q=0.5", True), ("text/html, application/json;q=0.9", False),
    ("application/*", True), ("text/*;q=0.1, application/json", True),
    ("application/json;q=0", False),
])
def test_accept_negotiation(accept, expected):
    assert wants_json(accept) is expected


# -- the direct layout of large tables is prettytable's own -----------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

_cell = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5).flatmap(lambda n: st.tuples(
    st.lists(_cell.filter(bool), min_size=n, max_size=n, unique=True),
    st.lists(st.lists(_cell, min_size=n, max_size=n), max_size=6))))
def test_plain_table_is_prettytables_layout(table):
    import prettytable
    headings, rows = table
    expected = prettytable.PrettyTable(headings)
    expected.align = "l"
    for row in rows:
        expected.add_row(row)
    assert tables.plain_table(headings, rows) == expected.get_string()


def test_plain_table_leaves_other_text_to_prettytable():
    assert tables.plain_table(["a"], [["two\nlines"]]) is None
    assert tables.plain_table(["a"], [["ünïcode"]]) is None


def test_a_large_node_list_renders_as_prettytable_would():
    import prettytable
    nodes = [Node(id=f"{i:010d}", state="ready", type=["small"], provider="sim", pool="main",
                  external_id=f"i-{i}", state_time=1000.0) for i in range(tables.PLAIN_TABLE_ROWS)]
    rows = tables.node_rows(nodes, set(), 2000.0, False)
    text = tables.render_text(tables.NODE_LIST, rows, 2000.0)
    expected = prettytable.PrettyTable([c.heading for c in tables.NODE_LIST.columns])
    expected.align = "l"
    for row in rows:
        expected.add_row([str(tables.format_cell(c, row.get(c.key), 2000.0))
                          for c in tables.NODE_LIST.columns])
    assert text == expected.get_string()
