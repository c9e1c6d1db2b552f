"""The podman driver's pure parts: its config keys, the ``podman run`` it composes, what it reads
from podman's JSON, how podman's errors are classed, and the Debian root's cache key and mirror.
(Real containers: tests/integration/test_podman_driver.py.)"""
import textwrap

import pytest
import voluptuous as v

from nodepool.builder import debian_root
from nodepool.config import load_config
from nodepool.drivers import get_driver
from nodepool.drivers.base import META_NODE_ID, META_POOL, META_PROVIDER, LaunchSpec
from nodepool.drivers.podman import DEFAULT_COMMAND, _command, _ulimit
from nodepool.drivers.podman.adapter import image_reference, published_port
from nodepool.drivers.podman.runtime import PodmanError, host_ulimits, last_line
from nodepool.errors import ConfigError, PermanentCloudError, TransientCloudError


def config(tmp_path, provider_extra="", label_extra="", image_extra=""):
    path = tmp_path / "nodepool.yaml"
    path.write_text(textwrap.dedent("""\
        embedded-store:
          path: {tmp}/s.sqlite
        labels:
          - name: node
          - name: plain
        diskimages:
          - name: debian-node
            elements: [debian-minimal, openssh-server, devuser]
        providers:
          - name: pod
            driver: podman
        {provider_extra}
            cloud-images:
              - name: plain
                image: docker.io/library/debian:12
        {image_extra}
            diskimages:
              - name: debian-node
                connection-port: 2222
            pools:
              - name: main
                max-servers: 3
                labels:
                  - name: node
                    diskimage: debian-node
        {label_extra}
                  - name: plain
                    cloud-image: plain
        """).format(tmp=tmp_path, provider_extra=provider_extra, label_extra=label_extra,
                    image_extra=image_extra))
    return load_config(str(path))


def test_defaults_and_image_format(tmp_path):
    prov = config(tmp_path).providers["pod"]
    assert prov.options["image-format"] == "tar"
    assert prov.options["runtime"] == "runc"
    assert prov.options["publish-address"] == "127.0.0.1"
    label = prov.pools["main"].labels["node"]
    assert (label.options["cores"], label.options["ram"]) == (1, 1024)
    assert config(tmp_path).diskimages["debian-node"].formats == ["tar"]


def test_bad_keys_name_the_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        config(tmp_path, provider_extra="    ulimits: {nofile: '10:5'}\n    runtimee: runc",
               label_extra="            ram: 2")
    text = str(info.value)
    assert "ulimits" in text and "soft limit 10 is above hard limit 5" in text
    assert "runtimee" in text and "ram" in text


def test_value_validators():
    assert _ulimit(1024) == "1024:1024" and _ulimit("10:20") == "10:20"
    for bad in (True, "a:b", "1:2:3", 1.5):
        with pytest.raises(v.Invalid):
            _ulimit(bad)
    assert _command("sshd -D") == ["/bin/sh", "-c", "sshd -D"]
    assert _command(["/usr/sbin/sshd", "-D"]) == ["/usr/sbin/sshd", "-D"]
    for bad in ("", [], [""], 3):
        with pytest.raises(v.Invalid):
            _command(bad)


def spec(prov, label="node", image=None):
    pool = prov.pools["main"]
    return LaunchSpec(hostname="np0000000042", label=pool.labels[label], pool=pool,
                      metadata={META_NODE_ID: "0000000042", META_POOL: "main",
                                META_PROVIDER: "pod"},
                      image_external_id=image, node_id="0000000042")


def test_run_arguments(tmp_path):
    prov = config(tmp_path, provider_extra="    ulimits: {nofile: 4096}\n    network: ci",
                  label_extra="            cores: 2\n            ram: 512"
                  ).providers["pod"]
    adapter = get_driver("podman").adapter(prov)
    settings = adapter.launch_settings(spec(prov, image="abc123"))
    assert settings["name"].startswith("np0000000042-") and settings["container_port"] == 2222
    args = adapter.run_args(settings)
    assert args[:6] == ["run", "--detach", "--name", settings["name"], "--hostname",
                        "np0000000042"]
    pairs = list(zip(args, args[1:]))
    for pair in [("--label", f"{META_NODE_ID}=0000000042"), ("--label", "nodepool_cores=2"),
                 ("--label", "nodepool_ram=512"), ("--ulimit", "nofile=4096:4096"),
                 ("--cpus", "2"), ("--memory", "512m"), ("--publish", "127.0.0.1::2222"),
                 ("--network", "ci")]:
        assert pair in pairs
    assert args[-len(DEFAULT_COMMAND) - 1:] == ["abc123"] + DEFAULT_COMMAND
    assert ("--ulimit", f"nproc={host_ulimits()['nproc']}") in pairs


def test_cloud_image_and_missing_upload(tmp_path):
    prov = config(tmp_path, image_extra="        command: /usr/sbin/sshd -D").providers["pod"]
    adapter = get_driver("podman").adapter(prov)
    settings = adapter.launch_settings(spec(prov, label="plain"))
    assert settings["image"] == "docker.io/library/debian:12"
    assert settings["command"] == ["/bin/sh", "-c", "/usr/sbin/sshd -D"]
    assert settings["container_port"] == 22
    with pytest.raises(PermanentCloudError, match="no uploaded image"):
        adapter.launch_settings(spec(prov))


def test_quota(tmp_path):
    prov = config(tmp_path, provider_extra="    max-cores: 16\n    max-ram: 4096"
                  ).providers["pod"]
    adapter = get_driver("podman").adapter(prov)
    assert adapter.quota_limits() == {"cores": 16, "ram": 4096}
    assert adapter.quota_for_label(prov.pools["main"].labels["node"]) == {
        "instances": 1, "cores": 1, "ram": 1024}
    limits = get_driver("podman").adapter(config(tmp_path).providers["pod"]).quota_limits()
    assert limits["cores"] >= 1 and limits["ram"] >= 64


def test_published_port_from_ps_and_inspect():
    ps = [{"host_ip": "127.0.0.1", "container_port": 80, "host_port": 8080, "protocol": "tcp"},
          {"host_ip": "127.0.0.1", "container_port": 22, "host_port": 40022, "protocol": "udp"},
          {"host_ip": "127.0.0.1", "container_port": 22, "host_port": 41022, "protocol": "tcp"}]
    assert published_port(ps, 22) == ("127.0.0.1", 41022)
    assert published_port(ps, 2222) == (None, None)
    assert published_port(None, 22) == (None, None)
    assert published_port(ps, None) == ("127.0.0.1", 8080)
    inspect = {"22/tcp": [{"HostIp": "", "HostPort": "41022"}], "80/tcp": None}
    assert published_port(inspect, 22) == (None, 41022)
    assert published_port(inspect, 80) == (None, None)


def test_image_reference():
    assert image_reference("Debian-Node-1733") == "localhost/debian-node-1733:latest"
    assert image_reference("a b/c") == "localhost/a-b-c:latest"


def test_podman_errors_are_classed():
    refused = PodmanError("podman run", 126, "Error: runc: runc create failed: ...: error "
                                             "setting rlimit type 7: OCI permission denied\n")
    assert isinstance(refused.cloud_error("node 1"), PermanentCloudError)
    assert str(refused) == ("podman run: runc: runc create failed: ...: error setting rlimit "
                            "type 7: OCI permission denied")
    gone = PodmanError("podman rm", 1, "Error: no container with name or id \"x\" found")
    assert gone.missing
    busy = PodmanError("podman ps", 125, "Error: database is locked")
    assert isinstance(busy.cloud_error("p"), TransientCloudError) and not busy.missing
    assert last_line("a\n\nError: b\n") == "b" and last_line("") == ""


def test_debian_root_packages_cache_key_and_mirror(tmp_path):
    assert debian_root.packages(["debian-minimal"], {}) == ["iproute2", "python3"]
    assert debian_root.packages(["debian-minimal", "openssh-server", "devuser"],
                                {"DIB_DEV_USER_PWDLESS_SUDO": "yes"}) == [
        "iproute2", "openssh-server", "python3", "sudo"]
    env = {"DIB_IMAGE_CACHE": str(tmp_path)}
    one = debian_root.cache_file(env, "bookworm", "http://m/debian", "amd64", ["a"])
    assert one.startswith(str(tmp_path) + "/debootstrap-bookworm-amd64-")
    assert one != debian_root.cache_file(env, "bookworm", "http://m/debian", "amd64", ["a", "b"])
    sources = tmp_path / "sources.list.d"
    sources.mkdir()
    (sources / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: x\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n")
    assert debian_root.apt_mirror([str(sources)]) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text("deb [arch=amd64] http://old.example/debian "
                                           "bookworm main\n")
    assert debian_root.apt_mirror([str(tmp_path / "sources.list")]) == "http://old.example/debian"
    assert debian_root.apt_mirror([str(tmp_path / "none")]) == debian_root.DEFAULT_MIRROR


def test_shipped_example_config_loads():
    repo = __file__.rsplit("/tests/", 1)[0]
    cfg = load_config(f"{repo}/examples/podman.yaml")
    prov = cfg.providers["local"]
    assert prov.driver == "podman" and cfg.diskimages["debian-node"].formats == ["tar"]
    assert cfg.diskimages["debian-node"].elements == ["debian-minimal", "openssh-server",
                                                      "devuser"]


def test_builtin_elements_need_no_directory_and_debian_root_needs_root(tmp_path, monkeypatch):
    from nodepool.builder import image_create
    found = image_create.find_elements(["debian-minimal", "openssh-server", "devuser"],
                                       str(tmp_path))
    assert found == {"debian-minimal": None, "openssh-server": None, "devuser": None}
    with pytest.raises(image_create.ImageCreateError, match="'nosuch' not found"):
        image_create.find_elements(["nosuch"], str(tmp_path))
    monkeypatch.setattr(debian_root.os, "geteuid", lambda: 1000)
    with pytest.raises(debian_root.DebianRootError, match="debian-minimal needs root"):
        debian_root.lay_down(str(tmp_path), ["debian-minimal"], {}, "amd64")


def test_inspected_container_becomes_an_instance_or_a_clear_failure(tmp_path, monkeypatch):
    import json
    prov = config(tmp_path).providers["pod"]
    adapter = get_driver("podman").adapter(prov)
    machine = adapter.create_state_machine(spec(prov, image="abc123"))
    machine.external_id = machine.settings["name"]
    monkeypatch.setattr(adapter, "output_tail", lambda name: "sshd: no hostkeys available")
    exited = [{"State": {"Status": "exited", "ExitCode": 1}}]
    with pytest.raises(PermanentCloudError, match=r"is exited \(exit code 1\): sshd: no "
                                                   r"hostkeys available"):
        machine._check(json.dumps(exited))
    unpublished = [{"State": {"Status": "running"}, "NetworkSettings": {"Ports": {}}}]
    with pytest.raises(PermanentCloudError, match="no published port for 2222"):
        machine._check(json.dumps(unpublished))
    with pytest.raises(TransientCloudError, match="unreadable podman inspect output"):
        machine._check("not json")
    running = [{"State": {"Status": "running"},
                "Config": {"Labels": {META_NODE_ID: "0000000042", META_PROVIDER: "pod",
                                      "nodepool_cores": "1", "nodepool_ram": "1024"}},
                "NetworkSettings": {"IPAddress": "10.88.0.5", "Ports": {
                    "2222/tcp": [{"HostIp": "127.0.0.1", "HostPort": "40001"}]}}}]
    inst = machine._check(json.dumps(running))
    assert machine.complete and inst.ready and inst.node_id == "0000000042"
    assert (inst.interface_ip, inst.public_ipv4, inst.connection_port, inst.private_ipv4) == (
        "127.0.0.1", "127.0.0.1", 40001, "10.88.0.5")
    assert inst.resources == {"instances": 1, "cores": 1, "ram": 1024}
