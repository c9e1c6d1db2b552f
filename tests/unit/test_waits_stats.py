"""Pure parts of the observability code: wait summaries, statsd names and gauge values."""

import pytest

from nodepool import stats, waits
from nodepool.config.model import Config, Label, Pool, Provider
from nodepool.errors import (LabelConfigurationError, LaunchTimeout, PermanentCloudError,
                             QuotaError, TransientCloudError)
from nodepool.model.records import Component, Node, NodeRequest
from nodepool.model.states import NodeState, RequestState


def w(t, label, warm, seconds, provider="p"):
    return waits.Wait(t, label, provider, warm, seconds)


def test_percentile_is_nearest_rank():
    assert waits.percentile([], 50) is None
    assert waits.percentile([3.0], 95) == 3.0
    values = list(range(1, 101))
    assert waits.percentile(values, 50) == 50
    assert waits.percentile(values, 95) == 95
    assert waits.percentile([5, 1, 3], 50) == 3


def test_summarize_per_label_and_provider_within_the_window():
    now = 10_000.0
    data = [w(now - 10, "a", True, 0.1), w(now - 20, "a", False, 30.0, "q"),
            w(now - 30, "a", True, 0.2), w(now - 5000, "a", False, 99.0),   # outside window
            w(now - 40, "b", False, 60.0)]
    rows = {(r["label"], r["provider"]): r for r in waits.summarize(data, now, 3600)}
    a = rows[("a", None)]
    assert (a["requests"], a["warm"], a["cold"]) == (3, 2, 1)
    assert a["warm_ratio"] == pytest.approx(2 / 3)
    assert a["p50"] == 0.2 and a["p95"] == 30.0
    assert a["p50_warm"] == 0.1 and a["p50_cold"] == 30.0
    assert rows[("a", "q")]["requests"] == 1 and rows[("a", "p")]["requests"] == 2
    assert rows[("b", None)]["warm_ratio"] == 0 and rows[("b", None)]["p50_warm"] is None


def test_series_buckets_time_and_label():
    now = 3600.0
    data = [w(100, "a", True, 1), w(110, "a", False, 9), w(3500, "b", True, 2)]
    s = waits.series(data, now, 3600, buckets=36)
    assert len(s) == 36 and s[1]["requests"] == 2 and s[1]["warm_ratio"] == 0.5
    assert s[35]["requests"] == 1 and s[10]["p50"] is None
    only_a = waits.series(data, now, 3600, buckets=36, label="a")
    assert sum(b["requests"] for b in only_a) == 2


def test_rows_round_trip_through_a_launcher_component_and_skip_garbage():
    ring = waits.Ring(3)
    for i in range(5):
        ring.add(w(float(i), "a", i % 2 == 0, i / 10).to_row())
    assert len(ring.rows) == 3 and ring.dirty
    comp = Component(kind="launcher", hostname="h1")
    comp.extra[waits.WAITS_KEY] = ring.rows + [["bad"], None]
    comp.extra[waits.FAILURES_KEY] = [{"time": 5, "node": "1"}, "junk", {"time": 9, "node": "2"}]
    back = Component.from_dict(comp.to_dict())
    got = waits.read_waits([back])
    assert [x.time for x in got] == [2.0, 3.0, 4.0] and got[0].warm and not got[1].warm
    fails = waits.read_failures([back])
    assert [f["node"] for f in fails] == ["2", "1"] and fails[0]["launcher"] == "h1"


def test_waits_of_a_request_one_per_distinct_label():
    req = NodeRequest(node_types=["b", "a", "b"])
    got = waits.waits_of_request(req, "p", False, -1.0, 7.0)
    assert [(x.label, x.seconds, x.warm) for x in got] == [("a", 0.0, False), ("b", 0.0, False)]


def test_clean_name_parts():
    assert stats.clean("zuul.example.com:tenant") == "zuul_example_com_tenant"
    assert stats.clean(None) == "none"


@pytest.mark.parametrize("exc,phase,key", [
    (None, None, "ready"),
    (QuotaError("q"), "create", "error.quota"),
    (LaunchTimeout("t"), "create", "error.servercreatetimeout"),
    (LaunchTimeout("t"), "scan", "error.keyscan"),
    (LabelConfigurationError("l"), "create", "error.nodepool"),
    (PermanentCloudError("e"), "create", "error.status"),
    (TransientCloudError("x"), "create", "error.unknown"),
    (RuntimeError("bug"), "create", "error.unknown"),
])
def test_launch_result_keys(exc, phase, key):
    assert stats.launch_result(exc, phase) == key


def _config():
    pool = Pool(name="main", provider="sim", max_servers=5, labels={"small": None})
    pool2 = Pool(name="other", provider="sim", labels={"small": None})     # unlimited
    prov = Provider(name="sim", driver="simulated", pools={"main": pool, "other": pool2})
    return Config(labels={"small": Label(name="small"), "big": Label(name="big")},
                  providers={"sim": prov})


def test_node_gauges_cover_every_state_and_count_multi_label_nodes_under_each():
    nodes = [Node(state=NodeState.READY, provider="sim", type=["small"]),
             Node(state=NodeState.IN_USE, provider="sim", type=["small", "big"]),
             Node(state=NodeState.READY, provider="gone", type=["old.label"])]
    values = stats.node_gauge_values(nodes, _config())
    assert values["nodepool.nodes.ready"] == 2 and values["nodepool.nodes.in-use"] == 1
    assert values["nodepool.label.small.nodes.in-use"] == 1
    assert values["nodepool.label.big.nodes.in-use"] == 1
    assert values["nodepool.label.old_label.nodes.ready"] == 1
    assert values["nodepool.provider.gone.nodes.ready"] == 1
    assert values["nodepool.label.big.nodes.hold"] == 0
    assert all(f"nodepool.nodes.{s.value}" in values for s in NodeState)
    assert values["nodepool.provider.sim.max_servers"] == 5


def test_addressable_requests_per_pool():
    comps = [Component(kind="pool", provider_name="sim", name="main",
                       supported_labels=["small", "big"]),
             Component(kind="pool", provider_name="sim", name="tiny", supported_labels=["small"])]
    reqs = [NodeRequest(node_types=["small", "big"]), NodeRequest(node_types=["small"]),
            NodeRequest(node_types=["small"], state=RequestState.FULFILLED)]
    values = stats.addressable_request_values(reqs, comps)
    assert values == {"nodepool.provider.sim.pool.main.addressable_requests": 2,
                      "nodepool.provider.sim.pool.tiny.addressable_requests": 1}


def test_without_statsd_host_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("STATSD_HOST", raising=False)
    assert stats.client() is None
    stats.launch("p", "az", "r", "ready", 1.0)      # a no-op, never an error
    assert stats.builder_state("h", set(), set(), set(), set(), ["i"], [], set())[
        "nodepool.builder.h.image.i.build.state"] == 0


def test_oldest_waiting_request_age_per_state():
    from types import SimpleNamespace as R
    from nodepool.metrics import oldest_waiting
    reqs = [R(state="requested", created_time=90.0), R(state="requested", created_time=40.0),
            R(state="pending", created_time=70.0), R(state="fulfilled", created_time=1.0),
            R(state="requested", created_time=None)]
    assert oldest_waiting(reqs, 100.0) == {"requested": 60.0, "pending": 30.0}
    assert oldest_waiting([R(state="pending", created_time=105.0)], 100.0) == {"pending": 0.0}
    assert oldest_waiting([], 100.0) == {}
