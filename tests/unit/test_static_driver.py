"""Static driver logic without servers: schema, slots, host-key checks, the reconcile plan."""
import pytest
import voluptuous as v

from nodepool.config.model import Config, Label, Pool, Provider
from nodepool.drivers.base import RegisteredSlot
from nodepool.drivers.static import DRIVER, node_schema, pool_label_names
from nodepool.drivers.static.adapter import (StaticAdapter, expand_slots, normalise_key,
                                             verify_host_keys)
from nodepool.errors import PermanentCloudError
from nodepool.launcher.provider_worker import (ForgetNode, RefreshSlot, RegisterSlot,
                                               ReturnToReady, TakeOutOfService, apply_slot,
                                               plan_registered_nodes)
from nodepool.model import Node

KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAAA"
KEY_B = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAB"


def nodes_cfg(*hosts):
    schema = v.Schema(node_schema())
    return [schema(h) for h in hosts]


def provider(*hosts, pool="hosts"):
    p = Pool(name=pool, provider="static", options={"nodes": nodes_cfg(*hosts)})
    return Provider(name="static", driver="static", pools={pool: p})


# -- schema ---------------------------------------------------------------------------------------

def test_node_defaults_and_string_labels():
    (node,) = nodes_cfg({"name": "h1", "labels": "linux"})
    assert node["labels"] == ["linux"]
    assert node["username"] == "zuul"
    assert node["max-parallel-jobs"] == 1
    assert node["host-key-checking"] is True
    assert node["timeout"] == 5


def test_node_requires_name_and_labels():
    with pytest.raises(v.Invalid):
        nodes_cfg({"name": "h1"})
    with pytest.raises(v.Invalid):
        nodes_cfg({"labels": ["x"]})
    with pytest.raises(v.Invalid):
        nodes_cfg({"name": "h1", "labels": []})


def test_pool_labels_come_from_hosts():
    prov = provider({"name": "h1", "labels": ["a", "b"]}, {"name": "h2", "labels": "b"})
    assert pool_label_names(prov.pools["hosts"]) == ["a", "b"]
    DRIVER.finalize(prov, Config())
    assert sorted(prov.pools["hosts"].labels) == ["a", "b"]
    assert prov.pools["hosts"].labels["a"].provider == "static"


def test_check_provider_unknown_label_and_duplicate_host():
    prov = provider({"name": "h1", "labels": "a"}, {"name": "h1", "labels": "zzz"})
    problems = DRIVER.check_provider(prov, Config(labels={"a": Label("a")}))
    messages = " | ".join(m for _, m in problems)
    assert "zzz is not a top-level label" in messages
    assert "host h1 port 22 with username zuul is already listed" in messages


# -- slots ----------------------------------------------------------------------------------------

def test_max_parallel_jobs_gives_slots_with_unique_ids():
    prov = provider({"name": "h1", "labels": "a", "max-parallel-jobs": 2,
                     "connection-port": 2222}, {"name": "h2", "labels": "a"})
    ids = [ext for _, _, _, ext in expand_slots(prov)]
    assert ids == ["h1:2222#0", "h1:2222#1", "h2:22#0"]


def test_unchecked_hosts_are_reported_with_unknown_health():
    adapter = StaticAdapter(provider({"name": "h1", "labels": "a"}))
    (slot,) = adapter.registered_nodes()        # no executor: nothing checked
    assert slot.answers is None and slot.labels == ["a"] and slot.connection_port == 22


def test_create_state_machine_refuses():
    adapter = StaticAdapter(provider({"name": "h1", "labels": "a"}))
    with pytest.raises(PermanentCloudError, match="never launch"):
        adapter.create_state_machine(None)
    assert adapter.delete_state_machine("h1:22#0").advance() is True


# -- host keys ------------------------------------------------------------------------------------

def test_normalise_key_drops_host_and_comment():
    assert normalise_key(f"[127.0.0.1]:22 {KEY_A} root@x") == KEY_A
    assert normalise_key(f"{KEY_B} comment") == KEY_B


def test_expected_key_must_be_offered():
    assert verify_host_keys("h1", [KEY_A + " me@x"], [KEY_A, KEY_B]) == sorted([KEY_A, KEY_B])
    with pytest.raises(PermanentCloudError, match="static host h1: host key mismatch"):
        verify_host_keys("h1", [KEY_A], [KEY_B])


# -- reconcile plan -------------------------------------------------------------------------------

def slot(ext="h1:22#0", answers=True, labels=("a",), keys=(KEY_A,), error=None, pool="hosts"):
    return RegisteredSlot(external_id=ext, pool=pool, labels=list(labels), slot=0,
                          interface_ip="h1", host_keys=list(keys), answers=answers, error=error)


def record(nid, s, state="ready", **kw):
    n = Node(id=nid, provider="static", state=state)
    apply_slot(n, s)
    for k, val in kw.items():
        setattr(n, k, val)
    return n


def test_answering_slot_without_node_is_registered():
    assert plan_registered_nodes("static", [slot()], [], set()) == [RegisterSlot("h1:22#0")]


def test_unchecked_or_dead_slot_is_not_registered():
    assert plan_registered_nodes("static", [slot(answers=None)], [], set()) == []
    assert plan_registered_nodes("static", [slot(answers=False)], [], set()) == []


def test_registered_matching_node_needs_nothing():
    s = slot()
    assert plan_registered_nodes("static", [s], [record("1", s)], set()) == []


def test_used_node_returns_to_ready_only_when_host_answers():
    s = slot()
    used = record("1", s, state="used", allocated_to="100-1")
    assert plan_registered_nodes("static", [s], [used], set()) == [ReturnToReady("1", s.external_id)]
    assert plan_registered_nodes("static", [slot(answers=False)], [used], set()) == []
    assert plan_registered_nodes("static", [s], [used], {"1"}) == []


def test_free_node_of_dead_host_is_taken_out_of_service():
    s = slot()
    dead = slot(answers=False, error="static host h1: cannot connect")
    assert plan_registered_nodes("static", [dead], [record("1", s)], set()) == [
        TakeOutOfService("1", s.external_id, "static host h1: cannot connect")]


def test_busy_nodes_of_dead_host_are_left_alone():
    s = slot()
    dead = slot(answers=False)
    nodes = [record("1", s, allocated_to="100-1"), record("2", s, state="in-use"),
             record("3", s, state="hold")]
    assert plan_registered_nodes("static", [dead], nodes, set()) == []
    assert plan_registered_nodes("static", [dead], [record("1", s)], {"1"}) == []


def test_changed_slot_refreshes_ready_node():
    old = slot(labels=("a",))
    new = slot(labels=("a", "b"), keys=(KEY_B,))
    assert plan_registered_nodes("static", [new], [record("1", old)], set()) == [
        RefreshSlot("1", old.external_id)]


def test_removed_slot_forgets_free_nodes_but_waits_for_busy_ones():
    gone = slot(ext="h9:22#0")
    nodes = [record("1", gone), record("2", gone, state="in-use"),
             record("3", gone, state="used")]
    actions = plan_registered_nodes("static", [], nodes, set())
    assert [a.node_id for a in actions] == ["1", "3"]
    assert all(isinstance(a, ForgetNode) for a in actions)


def test_duplicate_records_of_a_slot_are_forgotten():
    s = slot()
    actions = plan_registered_nodes("static", [s], [record("2", s), record("1", s)], set())
    assert actions == [ForgetNode("2", s.external_id, "duplicate record of the same slot")]


def test_other_providers_nodes_are_ignored():
    s = slot()
    other = record("1", slot(ext="x"))
    other.provider = "cloud"
    assert plan_registered_nodes("static", [s], [other], set()) == [RegisterSlot(s.external_id)]


def test_actions_are_rechecked_against_the_current_record():
    from nodepool.launcher.provider_worker import registered_action_applies
    s = slot()
    assert registered_action_applies(ReturnToReady("1", s.external_id),
                                     record("1", s, state="used"), s)
    assert not registered_action_applies(ReturnToReady("1", s.external_id),
                                         record("1", s, state="ready"), s)
    taken = record("1", s, allocated_to="100-1")
    assert not registered_action_applies(TakeOutOfService("1", s.external_id, "x"), taken, s)
    assert not registered_action_applies(ForgetNode("1", s.external_id, "x"), taken, s)
    assert registered_action_applies(ForgetNode("2", s.external_id, "dup"), record("2", s), s)


# -- through the config loader --------------------------------------------------------------------

def test_example_config_loads():
    import os
    from nodepool.config import load_config
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config = load_config(os.path.join(repo, "examples", "static.yaml"))
    pool = config.providers["lab"].pools["rack-1"]
    assert sorted(pool.labels) == ["arm64", "debian-bare-metal", "windows-2022"]
    assert len(expand_slots(config.providers["lab"])) == 4


def test_bad_static_config_names_the_host_entry(tmp_path):
    from nodepool.config import load_config
    from nodepool.errors import ConfigError
    path = tmp_path / "nodepool.yaml"
    path.write_text("labels:\n  - name: linux\nproviders:\n  - name: s\n    driver: static\n"
                    "    pools:\n      - name: p\n        nodes:\n"
                    "          - {name: h1, labels: [linux, nope]}\n"
                    "          - {name: h1, labels: linux}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    text = str(info.value)
    assert "providers[0].pools[0].nodes[0].labels: label nope is not a top-level label" in text
    assert "providers[0].pools[0].nodes[1]: host h1 port 22 with username zuul is already listed" in text
