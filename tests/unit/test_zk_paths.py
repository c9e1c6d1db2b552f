"""The ZooKeeper path layout and event classification (pure functions)."""
from nodepool.store.zk import paths as P
from nodepool.store.zk.recursive_watch import AddWatch, _ancestors


def test_classify_routes_cache_events():
    assert P.classify("/nodepool/nodes/0000000001") == ("node", "0000000001")
    assert P.classify("/nodepool/nodes/0000000001/lock") == ("node-lock", "0000000001")
    assert P.classify("/nodepool/nodes/0000000001/lock/ab__lock__0000000003") == \
        ("node-lock", "0000000001")
    assert P.classify("/nodepool/requests/100-0000000004") == ("request", "100-0000000004")
    assert P.classify("/nodepool/requests-lock/100-0000000004/x__lock__0000000000") == \
        ("request-lock", "100-0000000004")
    for other in ("/nodepool", "/nodepool/nodes", "/nodepool/images/debian/pause",
                  "/nodepool/components/pool/host0000000001", "/zuul/nodes/1"):
        assert P.classify(other) == (None, None)


def test_paths_match_nodepool_layout():
    assert P.upload_path("img", "b1", "cloud", "0000000002") == \
        "/nodepool/images/img/builds/b1/providers/cloud/images/0000000002"
    assert P.build_request_path("img") == "/nodepool/images/img/request-build"
    assert P.component_root("pool") == "/nodepool/components/pool"
    assert P.is_lock_contender("0f3a__lock__0000000001")
    assert not P.is_lock_contender("lock")


def test_add_watch_request_encoding():
    # jute: int32 length + utf-8 path, then int32 mode (1 = persistent recursive)
    assert bytes(AddWatch("/np", 1).serialize()) == b"\x00\x00\x00\x03/np\x00\x00\x00\x01"
    assert list(_ancestors("/a/b")) == ["/a/b", "/a", "/"]


def test_image_paths_parse_back():
    assert P.parse_image_path(P.build_path("img", "b1")) == ("build", "img", "b1")
    assert P.parse_image_path(P.upload_path("img", "b1", "cloud", "0000000002")) == \
        ("upload", "img", "b1", "cloud", "0000000002")
    assert P.parse_image_path(P.pause_path("img")) == ("pause", "img")
    for other in ("/nodepool/nodes/0000000001", "/nodepool/images/img",
                  "/nodepool/images/img/builds/lock", "/nodepool/images/img/request-build",
                  P.uploads_path("img", "b1", "cloud") + "/lock", "/nodepool/images//pause",
                  P.providers_path("img", "b1"), "nodepool/images/img/pause"):
        assert P.parse_image_path(other) is None, other
