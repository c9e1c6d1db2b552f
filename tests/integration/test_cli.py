"""The ``nodepool`` CLI run as a subprocess against a real SQLite store file."""
import json
import textwrap

import pytest

from nodepool.model.records import Node

pytestmark = pytest.mark.slow      # every test starts CLI processes


def table(text):
    """Parse a prettytable into a list of row dicts."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    heads = [h.strip() for h in lines[0].strip("|").split("|")]
    return [dict(zip(heads, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[1:]]


def ok(result):
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def one_line_error(result, *fragments):
    assert result.returncode == 1, f"rc={result.returncode}\n{result.stdout}\n{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def env(status_env):
    return status_env.populate()


def test_list_shows_every_node_with_lock_and_age(env):
    rows = table(ok(env.run_cli("list")))
    by_host = {r["ID"]: r for r in rows}
    assert set(by_host) == {n.id for n in env.nodes.values()}
    in_use = by_host[env.nodes["in-use"].id]
    assert in_use["Locked"] == "locked"
    assert in_use["Label"] == "big"
    assert in_use["State"] == "in-use"
    assert by_host[env.nodes["ready"].id]["Locked"] == "unlocked"
    assert by_host[env.nodes["ready"].id]["Server ID"] == "sim-ready"
    assert by_host[env.nodes["ready"].id]["Age"].startswith("00:00:")


def test_list_detail_and_json(env):
    rows = table(ok(env.run_cli("list", "--detail")))
    hold = next(r for r in rows if r["ID"] == env.nodes["hold"].id)
    assert hold["Comment"] == "debugging"
    assert hold["Pool"] == "main"
    assert hold["Port"] == "22"
    data = json.loads(ok(env.run_cli("list", "--json")))
    assert {d["id"] for d in data} == {n.id for n in env.nodes.values()}
    assert set(data[0]) == {"id", "provider", "label", "server_id", "public_ipv4", "ipv6",
                            "state", "age", "locked"}


def test_request_and_label_lists(env):
    rows = table(ok(env.run_cli("request-list")))
    assert [r["Request ID"] for r in rows] == [env.requests["pending"].id,
                                               env.requests["requested"].id]
    assert rows[0]["Node Types"] == "small,big"
    assert rows[0]["Declined By"] == "other-PoolWorker.x"
    data = json.loads(ok(env.run_cli("request-list", "--json")))
    assert data[0]["node_types"] == ["small", "big"]
    assert [r["Label"] for r in table(ok(env.run_cli("label-list")))] == ["big", "gpu", "small"]


def test_image_listings(env):
    build = env.builds["ready"]
    uploads = table(ok(env.run_cli("image-list")))
    assert {(u["Build ID"], u["State"]) for u in uploads} == {(build.id, "ready"),
                                                              (build.id, "uploading")}
    legacy = table(ok(env.run_cli("image-list", "--legacy")))
    current = next(r for r in legacy if r["State"] == "current")
    assert current["ID"] == env.uploads["ready"].id
    assert current["Age (hours)"] in ("1.00", "1.01")
    builds = table(ok(env.run_cli("dib-image-list")))
    assert {b["ID"] for b in builds} == {f"debian-{b.id}" for b in env.builds.values()}
    status = {r["Image"]: r for r in table(ok(env.run_cli("image-status")))}
    assert status["debian"]["Build Request"] == "building"     # requested, one in progress
    assert status["frozen"]["Paused"] == "True"
    data = json.loads(ok(env.run_cli("dib-image-list", "--json")))
    assert set(data[0]) == {"id", "image", "builder", "formats", "state", "age"}


def test_hold_with_reason(env):
    node = env.nodes["ready"]
    out = ok(env.run_cli("hold", node.id, "--reason", "look at the disk"))
    assert table(out)[0]["State"] == "hold"
    stored = env.store.get_node(node.id)
    assert stored.state == "hold"
    assert stored.comment == "look at the disk"


def test_delete_marks_deleting(env):
    node = env.nodes["failed"]
    row = table(ok(env.run_cli("delete", node.id)))[0]
    assert row["ID"] == node.id and row["State"] == "deleting"
    assert env.store.get_node(node.id).state == "deleting"
    assert not env.store.is_node_locked(node.id)


def test_delete_of_a_locked_node_fails_cleanly(env):
    node = env.nodes["in-use"]
    one_line_error(env.run_cli("delete", node.id), node.id, "locked")
    assert env.store.get_node(node.id).state == "in-use"


def test_delete_now_without_instance_removes_record(status_env):
    node = status_env.store.create_node(Node(state="failed", provider="sim", pool="main",
                                             type=["small"]))
    ok(status_env.run_cli("delete", node.id, "--now"))
    assert status_env.store.get_node(node.id) is None


def test_unknown_node_id(env):
    one_line_error(env.run_cli("delete", "0000009999"), "0000009999", "not found")
    one_line_error(env.run_cli("hold", "0000009999"), "0000009999", "not found")


def test_image_build_requests_and_refusals(env):
    ok(env.run_cli("image-build", "debian"))
    assert env.store.get_image_build_request("debian") is not None
    one_line_error(env.run_cli("image-build", "nosuch"), "nosuch")
    one_line_error(env.run_cli("image-build", "base"), "abstract")
    one_line_error(env.run_cli("image-build", "frozen"), "paused")


def test_image_pause_and_unpause(env):
    ok(env.run_cli("image-pause", "debian"))
    assert env.store.is_image_paused("debian")
    ok(env.run_cli("image-unpause", "debian"))
    assert not env.store.is_image_paused("debian")
    one_line_error(env.run_cli("image-pause", "nosuch"), "nosuch")


def test_image_delete_reports_nodes_still_using_it(env):
    up = env.uploads["ready"]
    result = env.run_cli("image-delete", "--provider", "sim", "--image", "debian",
                         "--build-id", up.build_id, "--upload-id", up.id)
    ok(result)
    assert env.nodes["ready"].id in result.stderr
    assert env.store.get_upload("debian", up.build_id, "sim", up.id).state == "deleting"


def test_image_delete_refuses_uploading_and_accepts_the_2014_form(env):
    up = env.uploads["uploading"]
    one_line_error(env.run_cli("image-delete", "--provider", "sim", "--image", "debian",
                               "--build-id", up.build_id, "--upload-id", up.id), "uploading")
    ok(env.run_cli("delete-image", env.uploads["ready"].id))
    ready = env.uploads["ready"]
    assert env.store.get_upload("debian", ready.build_id, "sim", ready.id).state == "deleting"
    one_line_error(env.run_cli("image-delete", "--provider", "sim"), "--upload-id")


def test_dib_image_delete(env):
    building = env.builds["building"]
    one_line_error(env.run_cli("dib-image-delete", f"debian-{building.id}"), "building")
    ready = env.builds["ready"]
    result = env.run_cli("dib-image-delete", f"debian-{ready.id}")
    ok(result)
    assert env.nodes["ready"].id in result.stderr
    assert env.store.get_build("debian", ready.id).state == "deleting"
    one_line_error(env.run_cli("dib-image-delete", "debian-nosuch"), "nosuch", "not found")


def test_info_and_erase(env):
    out = ok(env.run_cli("info", "sim"))
    assert env.uploads["ready"].id in out and env.nodes["hold"].id in out
    result = env.run_cli("erase", "sim", input="n\n")
    assert result.returncode == 1
    assert env.store.get_node(env.nodes["hold"].id) is not None
    ok(env.run_cli("erase", "sim", input="y\n"))
    assert [n for n in env.store.list_nodes() if n.provider == "sim"] == []
    assert env.store.list_uploads(provider="sim") == []


def test_config_validate(status_env, tmp_path):
    assert "Config is valid" in ok(status_env.run_cli("config-validate"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("labels:\n  - name: x\n    min-ready: lots\nproviders: 7\n")
    result = status_env.run_cli("config-validate", config=str(bad))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "min-ready" in result.stderr or "providers" in result.stderr


def test_cli_works_without_a_provider_s_cloud_and_check_clouds_reports_it(status_env,
                                                                          tmp_path,
                                                                          monkeypatch):
    empty = tmp_path / "clouds.yaml"
    empty.write_text("clouds: {}\n")
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(empty))
    cfg = tmp_path / "with-openstack.yaml"
    cfg.write_text(open(status_env.config_path).read() + textwrap.indent(textwrap.dedent("""\
          - name: gone
            driver: openstack
            cloud: no-such-cloud
            cloud-images:
              - name: cirros
            pools:
              - name: main
                labels:
                  - name: small
                    cloud-image: cirros
                    min-ram: 512
        """), "  "))
    status_env.populate()
    assert len(table(ok(status_env.run_cli("list", config=str(cfg))))) == len(status_env.nodes)
    assert "Config is valid" in ok(status_env.run_cli("config-validate", config=str(cfg)))
    checked = status_env.run_cli("config-validate", "--check-clouds", config=str(cfg))
    assert checked.returncode == 1, checked.stderr
    [line] = checked.stderr.strip().splitlines()
    assert line.startswith("provider gone: ") and "no-such-cloud" in line
    assert "Traceback" not in checked.stderr
    assert "Config is invalid: 1 problem(s)" in checked.stdout
    assert "Config is valid" in ok(status_env.run_cli("config-validate", "--check-clouds"))


def test_bad_inputs_are_one_line_errors(status_env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("labels: [\n")
    one_line_error(status_env.run_cli("list", config=str(bad)), "bad.yaml")
    one_line_error(status_env.run_cli("list", config=str(tmp_path / "missing.yaml")),
                   "missing.yaml")
    corrupt_dir = tmp_path / "corrupt"
    corrupt_dir.mkdir()
    (corrupt_dir / "state.sqlite").write_bytes(b"this is not a database" * 100)
    cfg = corrupt_dir / "nodepool.yaml"
    cfg.write_text(open(status_env.config_path).read().replace(str(tmp_path) + "/state.sqlite",
                                                               str(corrupt_dir / "state.sqlite")))
    one_line_error(status_env.run_cli("list", config=str(cfg)))
    usage = status_env.run_cli("delete")
    assert usage.returncode == 2
    assert status_env.run_cli("no-such-command").returncode == 2


def test_version_and_debug(status_env):
    result = status_env.run_cli("--version")
    assert result.returncode == 0 and "nodepool" in result.stdout
    debug = status_env.run_cli("--debug", "delete", "0000009999")
    assert debug.returncode == 1
    assert "not found" in debug.stderr.strip().splitlines()[-1]


def test_delete_now_deletes_the_instance_in_the_cloud(status_env):
    from nodepool.drivers import get_driver
    from nodepool.drivers.base import LaunchSpec
    provider = status_env.config.providers["sim"]
    pool = provider.pools["main"]
    adapter = get_driver(provider.driver).adapter(provider)
    adapter.start()
    try:
        machine = adapter.create_state_machine(LaunchSpec(
            hostname="np-cli", label=pool.labels["small"], pool=pool, metadata={}))
        for _ in range(1000):
            if machine.advance():
                break
        assert machine.external_id
        node = status_env.store.create_node(Node(state="ready", provider="sim", pool="main",
                                                 type=["small"],
                                                 external_id=machine.external_id))
        ok(status_env.run_cli("delete", node.id, "--now"))
        assert status_env.store.get_node(node.id) is None
        alive = [i for i in adapter.list_instances() if not i.deleted]
        assert machine.external_id not in {i.external_id for i in alive}
    finally:
        adapter.stop()


# -- image data export / import ------------------------------------------------------------------

def test_image_data_round_trip_between_sqlite_and_zookeeper(env, tmp_path, zookeeper_server,
                                                            zk_chroot):
    from fixtures.launcher import zookeeper_yaml
    from nodepool.config import load_config
    from nodepool.model.records import ImageUpload
    from nodepool.store import open_store
    exported = tmp_path / "images.json"
    assert "exported 5 image record(s)" in ok(env.run_cli("export-image-data", str(exported)))
    assert exported.stat().st_mode & 0o777 == 0o600
    data = json.loads(exported.read_text())
    ready, uploading = env.uploads["ready"], env.uploads["uploading"]
    build_path = f"/nodepool/images/debian/builds/{env.builds['ready'].id}"
    assert json.loads(data[build_path])["state"] == "ready"
    upload_path = f"{build_path}/providers/sim/images/{ready.id}"
    assert json.loads(data[upload_path])["external_id"] == "img-1"
    assert data["/nodepool/images/frozen/pause"] == ""

    zk_config = tmp_path / "zk.yaml"
    zk_config.write_text(zookeeper_yaml(zookeeper_server, zk_chroot))
    out = ok(env.run_cli("import-image-data", str(exported), config=str(zk_config)))
    assert "imported 2 build(s), 2 upload(s) and 1 pause flag(s)" in out
    zk = open_store(load_config(str(zk_config)))
    zk.start()
    try:
        assert {(b.id, b.state) for b in zk.list_builds()} == \
            {(b.id, b.state) for b in env.store.list_builds()}
        assert [(u.provider, u.id, u.state, u.external_id) for u in zk.list_uploads()] == \
            [(u.provider, u.id, u.state, u.external_id) for u in env.store.list_uploads()]
        assert zk.is_image_paused("frozen")
        # new uploads of that build number after the restored ones, on both stores
        for store in (zk, env.store):
            new = store.create_upload(ImageUpload(image="debian", build_id=ready.build_id,
                                                  provider="sim"))
            assert int(new.id) > int(uploading.id)
            store.delete_upload("debian", ready.build_id, "sim", new.id)
        # exporting from ZooKeeper gives the same file back
        again = tmp_path / "again.json"
        ok(env.run_cli("export-image-data", str(again), config=str(zk_config)))
        assert json.loads(again.read_text()).keys() == data.keys()
        # a second import changes nothing and says why
        error = one_line_error(env.run_cli("import-image-data", str(exported),
                                           config=str(zk_config)), "nothing imported")
        assert "already exists" in error
    finally:
        zk.stop()


def test_import_image_data_rejects_bad_files_before_writing(env, tmp_path):
    bad = tmp_path / "bad.json"
    build = "/nodepool/images/ubuntu/builds/abc"
    for content, fragment in (
            ("[1, 2]", "expected a JSON object"),
            ("{not json", "not JSON"),
            (json.dumps({build: "{}", "/nodepool/nodes/0000000001": "{}"}),
             "'/nodepool/nodes/0000000001' is not an image build"),
            (json.dumps({build: "{broken"}), f"{build}: not JSON"),
            (json.dumps({f"{build}/providers/sim/images/0000000001": "{}"}),
             "its build is neither in the file nor in the store")):
        bad.write_text(content)
        one_line_error(env.run_cli("import-image-data", str(bad)), fragment)
    assert env.store.get_build("ubuntu", "abc") is None
    one_line_error(env.run_cli("import-image-data", str(tmp_path / "missing.json")),
                   "cannot read")
