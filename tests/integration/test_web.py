"""The status web app served on a free loopback port, read with urllib, over a real SQLite store."""
import json
import urllib.error
import urllib.request

import pytest

from nodepool.web.app import StatusWebApp

pytestmark = pytest.mark.slow      # starts an HTTP server thread


@pytest.fixture(params=["sqlite", "zookeeper"])
def web(request):
    status_env = request.getfixturevalue(
        "status_env" if request.param == "sqlite" else "zk_status_env")
    status_env.populate()
    app = StatusWebApp(status_env.store, lambda: status_env.config, 0, "127.0.0.1")
    app.start()
    app.env = status_env
    try:
        yield app
    finally:
        app.stop()


def get(app, path, accept=None):
    req = urllib.request.Request(f"http://127.0.0.1:{app.port}{path}")
    if accept:
        req.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def test_ready_is_503_until_the_launcher_says_so(web):
    assert get(web, "/ready")[0] == 503
    web.ready = True
    status, _, body = get(web, "/ready")
    assert (status, body) == (200, "OK")


def test_node_list_text_and_json(web):
    status, headers, body = get(web, "/node-list")
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert headers["Content-Type"].startswith("text/plain")
    assert "| ID" in body and web.env.nodes["hold"].id in body
    status, headers, body = get(web, "/node-list", accept="application/json")
    assert headers["Content-Type"] == "application/json"
    data = json.loads(body)
    assert {d["id"] for d in data} == {n.id for n in web.env.nodes.values()}
    locked = {d["id"]: d["locked"] for d in data}
    assert locked[web.env.nodes["in-use"].id] == "locked"


def test_json_suffix_node_id_and_fields(web):
    node_id = web.env.nodes["hold"].id
    data = json.loads(get(web, f"/node-list.json?node_id={node_id}")[2])
    assert [d["id"] for d in data] == [node_id]
    assert data[0]["comment"] == "debugging"
    _, _, body = get(web, "/node-list?fields=id,state")
    header = body.splitlines()[1]
    assert [h.strip() for h in header.strip("|").split("|")] == ["ID", "State"]
    assert get(web, "/node-list?fields=nonsense")[0] == 400


def test_other_listings(web):
    env = web.env
    uploads = json.loads(get(web, "/image-list.json")[2])
    assert {u["upload_id"] for u in uploads} == {u.id for u in env.uploads.values()}
    builds = json.loads(get(web, "/dib-image-list", accept="application/json")[2])
    assert {b["id"] for b in builds} == {f"debian-{b.id}" for b in env.builds.values()}
    status = {s["image"]: s for s in json.loads(get(web, "/image-status.json")[2])}
    assert status["frozen"]["paused"] is True
    requests = json.loads(get(web, "/request-list.json")[2])
    assert [r["id"] for r in requests] == [env.requests["pending"].id,
                                           env.requests["requested"].id]
    labels = json.loads(get(web, "/label-list.json")[2])
    assert labels == [{"label": "big"}, {"label": "gpu"}, {"label": "small"}]
    assert "| Label" in get(web, "/label-list")[2]


def test_unknown_path_is_404(web):
    assert get(web, "/nope")[0] == 404
    assert get(web, "/node-list/extra")[0] == 404


def test_metrics_include_store_gauges(web):
    status, _, body = get(web, "/metrics")
    assert status == 200
    assert 'nodepool_nodes{label="small",provider="sim",state="hold"} 1.0' in body
    assert 'nodepool_requests{state="pending"} 1.0' in body
    ages = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
            if line.startswith("nodepool_request_oldest_age_seconds{")}
    assert set(ages) == {"requested", "pending"}
    assert 120 <= ages["pending"] < 600 and 0 <= ages["requested"] < 120
    assert "nodepool_launches_total" in body or "# TYPE nodepool_launches counter" in body


class BrokenStore:
    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise RuntimeError("database disk image is malformed")
        return fail


def test_store_errors_are_500_and_the_server_survives(tmp_path):
    app = StatusWebApp(BrokenStore(), lambda: None, 0, "127.0.0.1")
    app.start()
    try:
        status, _, body = get(app, "/node-list")
        assert status == 500
        assert body.strip().count("\n") == 0 and "malformed" in body
        assert get(app, "/request-list.json")[0] == 500
        assert get(app, "/metrics")[0] == 200        # store gauges missing, still a scrape
        app.ready = True
        assert get(app, "/ready")[0] == 200
    finally:
        app.stop()
