"""Loading and validating nodepool.yaml: real files in tmp_path, the simulated driver and a tiny
driver registered by the test to exercise the schema hooks."""
import math
import os
import textwrap

import pytest
import voluptuous as v

from nodepool import drivers
from nodepool.config import load_config, validate_config
from nodepool.config.loader import resolve_diskimages, substitute_env
from nodepool.config.model import (CloudImage, Config, DiskImage, Label, Pool, PoolLabel,
                                   Provider, ProviderDiskImage)
from nodepool.drivers.base import Driver
from nodepool.errors import ConfigError


def write(tmp_path, body, name="nodepool.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def problems_of(tmp_path, body, secure=None):
    """The (key, message) problems of a config that must be invalid."""
    path = write(tmp_path, body)
    secure_path = write(tmp_path, secure, "secure.yaml") if secure is not None else None
    with pytest.raises(ConfigError) as info:
        load_config(path, secure_path)
    return info.value.problems


def assert_problem(problems, key, fragment):
    assert any(k == key and fragment in m for k, m in problems), problems


SIM_PROVIDER = """\
labels:
  - name: small
providers:
  - name: sim
    driver: simulated
    cloud-images:
      - name: stock
    pools:
      - name: main
        labels:
          - name: small
            cloud-image: stock
"""

FULL = """\
embedded-store:
  path: state/nodepool.sqlite
  session-timeout: 4
webapp:
  port: 9000
  listen_address: 127.0.0.1
zookeeper-servers:
  - host: zk1.example.com
  - host: zk2.example.com
    port: 2181
    chroot: /nodepool
zookeeper-tls:
  ca: tls/ca.pem
  cert: /etc/tls/client.pem
  key: tls/client.key
zookeeper-timeout: 30
max-hold-age: 86400
images-dir: images
build-log-dir: logs
build-log-retention: 3
elements-dir: elements:/opt/more-elements
labels:
  - name: small
    min-ready: 2
  - name: big
    max-ready-age: 3600
  - name: spare
diskimages:
  - name: base
    abstract: true
    elements: [vm, simple-init]
    env-vars: {DIB_A: "1", DIB_B: "2"}
    release: 12
    metadata: {owner: ci}
  - name: debian
    parent: base
    elements: [debian-minimal]
    env-vars: {DIB_B: "two"}
    formats: [raw]
    rebuild-age: 3600
tenant-resource-limits:
  - tenant-name: acme
    max-servers: 10
    max-ram: 4096
    L-1216C47A: 64
providers:
  - name: sim
    driver: simulated
    priority: 50
    rate: 5
    max-concurrency: 4
    boot-time: 0.5
    quota: {instances: 20}
    diskimages:
      - name: debian
        connection-type: winrm
    cloud-images:
      - name: stock
        username: admin
        image-id: img-1
    pools:
      - name: main
        max-servers: 8
        max-cores: 64
        max-resources: {gpus: 2}
        node-attributes: {region: east}
        availability-zones: [az1, az2]
        labels:
          - name: small
            cloud-image: stock
          - name: big
            diskimage: debian
            cores: 8
            ram: 16384
      - name: idle
        max-servers: 0
        priority: 7
"""


# -- valid configurations -------------------------------------------------------------------------

def test_full_example_builds_the_dataclasses(tmp_path):
    config = load_config(write(tmp_path, FULL))
    assert isinstance(config, Config)
    assert config.path.endswith("nodepool.yaml")
    assert config.labels == {"small": Label("small", 2, 0), "big": Label("big", 0, 3600),
                             "spare": Label("spare")}
    assert config.webapp.port == 9000 and config.webapp.listen_address == "127.0.0.1"
    assert [(s.host, s.port, s.chroot) for s in config.zookeeper_servers] == [
        ("zk1.example.com", 2281, None), ("zk2.example.com", 2181, "/nodepool")]
    assert config.zookeeper_timeout == 30 and config.max_hold_age == 86400
    assert config.build_log_retention == 3
    assert config.embedded_store.session_timeout == 4
    assert config.tenant_limits["acme"].limits == {"instances": 10, "ram": 4096,
                                                   "L-1216C47A": 64}

    prov = config.providers["sim"]
    assert isinstance(prov, Provider)
    assert (prov.driver, prov.priority, prov.rate, prov.max_concurrency) == ("simulated", 50, 5, 4)
    # the simulated driver's defaults of the shared keys, and its own keys in options
    assert (prov.boot_timeout, prov.launch_timeout, prov.launch_retries) == (60, 3600, 3)
    assert prov.options["boot-time"] == 0.5 and prov.options["quota"] == {"instances": 20}
    assert prov.options["api-error-rate"] == 0.0
    assert "priority" not in prov.options and "pools" not in prov.options
    assert prov.diskimages["debian"] == ProviderDiskImage("debian", connection_type="winrm",
                                                          connection_port=5986)
    assert prov.cloud_images["stock"] == CloudImage(
        "stock", username="admin", options={"image-id": "img-1", "exists": True})

    main = prov.pools["main"]
    assert isinstance(main, Pool) and main.key == "sim/main"
    assert (main.max_servers, main.max_cores, main.max_ram) == (8, 64, math.inf)
    assert main.limits == {"instances": 8, "cores": 64, "gpus": 2}
    assert main.priority == 50 and main.azs == ["az1", "az2"]
    assert main.node_attributes == {"region": "east"}
    assert main.labels["small"] == PoolLabel("small", "main", "sim", cloud_image="stock",
                                             options={"cores": 1, "ram": 1024})
    assert main.labels["big"].diskimage == "debian"
    assert main.labels["big"].options == {"cores": 8, "ram": 16384}
    off = prov.pools["idle"]
    assert off.max_servers == 0 and off.priority == 7 and off.labels == {}


def test_relative_paths_resolve_against_the_config_directory(tmp_path):
    config = load_config(write(tmp_path, FULL))
    base = str(tmp_path)
    assert config.embedded_store.path == os.path.join(base, "state", "nodepool.sqlite")
    assert config.images_dir == os.path.join(base, "images")
    assert config.build_log_dir == os.path.join(base, "logs")
    assert config.elements_dir == f"{base}/elements:/opt/more-elements"
    assert config.zookeeper_tls.ca == os.path.join(base, "tls", "ca.pem")
    assert config.zookeeper_tls.cert == "/etc/tls/client.pem"
    assert config.zookeeper_tls.key == os.path.join(base, "tls", "client.key")
    # the simulated driver's finalize() put its state file beside the store
    assert config.providers["sim"].options["state-file"] == os.path.join(
        base, "state", "simulated-sim.json")


def test_defaults_of_a_minimal_file(tmp_path):
    config = load_config(write(tmp_path, "labels: []\n"))
    assert config.providers == {} and config.diskimages == {} and config.tenant_limits == {}
    assert config.webapp.port == 8005 and config.webapp.listen_address == "0.0.0.0"
    assert config.zookeeper_servers == [] and config.zookeeper_tls is None
    assert config.zookeeper_timeout == 10.0 and config.max_hold_age == 0
    assert config.embedded_store.path == "/var/lib/nodepool/nodepool.sqlite"
    assert config.embedded_store.session_timeout == 10
    assert config.build_log_dir == "/var/log/nodepool/builds"
    assert config.build_log_retention == 7
    assert config.images_dir is None and config.elements_dir is None
    assert config.warnings == []


def test_provider_and_pool_defaults(tmp_path):
    prov = load_config(write(tmp_path, SIM_PROVIDER)).providers["sim"]
    assert prov.rate == 0        # simulated driver's own default for rate
    assert prov.priority == 100 and prov.max_concurrency == -1
    assert prov.image_name_format == "{image_name}-{timestamp}"
    assert prov.image_upload_timeout == 3600 and prov.post_upload_hook is None
    pool = prov.pools["main"]
    assert pool.max_servers == math.inf and pool.limits == {}
    assert pool.host_key_checking is True and pool.ignore_provider_quota is False
    assert prov.cloud_images["stock"].connection_port == 22


def test_raw_dicts_are_the_validated_yaml(tmp_path):
    path = write(tmp_path, SIM_PROVIDER)
    first, second = load_config(path), load_config(path)
    assert first.raw["providers"][0]["name"] == "sim"
    assert first.raw["webapp"] == {"port": 8005, "listen_address": "0.0.0.0"}
    assert first.providers["sim"].raw == second.providers["sim"].raw
    assert first.providers["sim"].raw["rate"] == 0
    write(tmp_path, SIM_PROVIDER.replace("name: main", "name: main\n        max-servers: 3"))
    assert load_config(path).providers["sim"].raw != first.providers["sim"].raw


def test_files_changed_follows_the_mtime(tmp_path):
    path = write(tmp_path, SIM_PROVIDER)
    config = load_config(path)
    assert list(config.source_mtimes) == [path]
    assert not config.files_changed()
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert config.files_changed()


# -- unreadable and malformed files ---------------------------------------------------------------

@pytest.mark.parametrize("body, fragment", [
    ("", "file is empty"),
    ("# only a comment\n", "file is empty"),
    ("- a\n- b\n", "top level must be a mapping of keys, not a list"),
    ("just text\n", "top level must be a mapping of keys, not a string"),
    ("labels: [\n", "invalid YAML at line 2, column 1"),
    ("labels:\n  - name: a\n   min-ready: 1\n", "invalid YAML at line 3, column 4"),
    ("labels: []\nlabels: []\n", "duplicate key 'labels' (first given on line 1)"),
])
def test_bad_documents_are_one_clear_problem(tmp_path, body, fragment):
    problems = problems_of(tmp_path, body)
    assert len(problems) == 1
    assert problems[0][0] == "" and fragment in problems[0][1], problems


def test_yaml_anchors_and_merge_keys_may_be_overridden(tmp_path):
    body = """\
    labels:
      - &small {name: small, min-ready: 1}
      - {<<: *small, name: small-b, min-ready: 3}
    """
    config = load_config(write(tmp_path, body))
    assert config.labels["small-b"].min_ready == 3 and config.labels["small"].min_ready == 1


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml")
    assert str(info.value) == f"{tmp_path}/absent.yaml: file does not exist"
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_path_through_a_file_and_binary_content(tmp_path):
    blocker = write(tmp_path, "labels: []\n", "plain")
    with pytest.raises(ConfigError, match="cannot read file: Not a directory"):
        load_config(os.path.join(blocker, "nodepool.yaml"))
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"labels: [\xff\xfe]\n")
    with pytest.raises(ConfigError, match="file is not UTF-8 text"):
        load_config(binary)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = write(tmp_path, "labels: []\n")
    os.chmod(path, 0)
    with pytest.raises(ConfigError, match="not readable"):
        load_config(path)


def test_error_text_names_file_key_and_problem(tmp_path):
    path = write(tmp_path, SIM_PROVIDER.replace("name: main", "name: main\n        max-server: 3"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: providers[0].pools[0].max-server: "
                               "unknown key (did you mean 'max-servers'?)")
    assert info.value.path == path


# -- schema problems ------------------------------------------------------------------------------

@pytest.mark.parametrize("body, key, fragment", [
    ("labels:\n  - name: a\n    min-ready: lots\n", "labels[0].min-ready", "expected int"),
    ("labels:\n  - name: a\n    min-ready: -2\n", "labels[0].min-ready", "must be >= 0"),
    ("labels:\n  - name: a\n    max-ready-age: -1\n", "labels[0].max-ready-age", ">= 0"),
    ("labels:\n  - min-ready: 1\n", "labels[0].name", "required key is missing"),
    ("labels:\n  - name: ''\n", "labels[0].name", "must not be empty"),
    ("labels:\n  - name: off\n", "labels[0].name", "got a boolean (quote it"),
    ("labels: {name: a}\n", "labels", "expected a list"),
    ("labels:\n  - just-a-name\n", "labels[0]", "expected a mapping"),
    ("providers: 7\n", "providers", "expected a list"),
    ("webapp: {port: 'x'}\n", "webapp.port", "expected int"),
    ("webapp: {listen-address: 'x'}\n", "webapp.listen-address",
     "unknown key (did you mean 'listen_address'?)"),
    ("zookeeper-servers:\n  - port: 2181\n", "zookeeper-servers[0].host", "required key"),
    ("zookeeper-tls: {ca: a, cert: b}\n", "zookeeper-tls.key", "required key is missing"),
    ("zookeeper-timeout: true\n", "zookeeper-timeout", "expected a number"),
    ("embedded-store: {session-timeout: -1}\n", "embedded-store.session-timeout", ">= 0"),
    ("embedded-store: {paht: x}\n", "embedded-store.paht", "did you mean 'path'?"),
    ("tenant-resource-limits:\n  - tenant-name: t\n    max-servers: -1\n",
     "tenant-resource-limits[0].max-servers", ">= 0"),
    ("tenant-resource-limits:\n  - max-servers: 1\n", "tenant-resource-limits[0].tenant-name",
     "required key"),
    ("diskimages:\n  - name: d\n    env-vars: {A: 1}\n", "diskimages[0].env-vars.A",
     "expected str"),
    ("diskimages:\n  - name: d\n    elements: vm\n", "diskimages[0].elements", "expected a list"),
    ("diskimages:\n  - name: d\n    pause: yes-please\n", "diskimages[0].pause", "expected bool"),
    ("label:\n  - name: a\n", "label", "unknown key (did you mean 'labels'?)"),
    ("zookeper-servers: []\n", "zookeper-servers", "did you mean 'zookeeper-servers'?"),
    ("frobnicate: 1\n", "frobnicate", "unknown key"),
])
def test_schema_problems(tmp_path, body, key, fragment):
    assert_problem(problems_of(tmp_path, body), key, fragment)


@pytest.mark.parametrize("old, new, key, fragment", [
    ("name: main", "name: main\n        max-servers: -1", "providers[0].pools[0].max-servers",
     "must be >= 0"),
    ("name: main", "name: main\n        max-ram: 1.5", "providers[0].pools[0].max-ram",
     "expected int"),
    ("name: main", "name: main\n        max-resources: {gpus: -1}",
     "providers[0].pools[0].max-resources.gpus", ">= 0"),
    ("driver: simulated", "driver: simulated\n    rate: -1", "providers[0].rate", ">= 0"),
    ("driver: simulated", "driver: simulated\n    boot-timeout: soon",
     "providers[0].boot-timeout", "expected a number"),
    ("driver: simulated", "driver: simulated\n    max-concurency: 1",
     "providers[0].max-concurency", "did you mean 'max-concurrency'?"),
    ("driver: simulated", "driver: simulated\n    boot-tme: 1",
     "providers[0].boot-tme", "did you mean 'boot-time'?"),        # a driver key
    ("driver: simulated", "driver: simulated\n    quota: {instance: 3}",
     "providers[0].quota.instance", "did you mean 'instances'?"),   # nested driver key
    ("cloud-image: stock", "cloud-image: stock\n            core: 2",
     "providers[0].pools[0].labels[0].core", "did you mean 'cores'?"),
    ("cloud-image: stock", "cloud-image: stock\n            cores: 0",
     "providers[0].pools[0].labels[0].cores", "value must be at least 1"),
    ("- name: stock", "- name: stock\n        exists: maybe",
     "providers[0].cloud-images[0].exists", "expected bool"),
    ("driver: simulated", "driver: nosuch", "providers[0].driver", "unknown driver 'nosuch'"),
    ("driver: simulated", "driver: [simulated]", "providers[0].driver", "expected str"),
])
def test_provider_schema_problems(tmp_path, old, new, key, fragment):
    assert old in SIM_PROVIDER
    assert_problem(problems_of(tmp_path, SIM_PROVIDER.replace(old, new, 1)), key, fragment)


def test_every_problem_is_collected(tmp_path):
    body = """\
    labels:
      - name: a
        min-ready: x
      - name: b
        max-ready-age: y
    webapp: {port: z}
    providers:
      - name: p1
        driver: simulated
        pools:
          - name: one
            max-server: 1
          - name: two
            max-cores: -4
      - name: p2
        driver: simulated
        rat: 3
    """
    keys = {k for k, _ in problems_of(tmp_path, body)}
    assert keys == {"labels[0].min-ready", "labels[1].max-ready-age", "webapp.port",
                    "providers[0].pools[0].max-server", "providers[0].pools[1].max-cores",
                    "providers[1].rat"}


# -- cross-checks ---------------------------------------------------------------------------------

def test_duplicate_names(tmp_path):
    body = """\
    labels: [{name: a}, {name: a}]
    diskimages: [{name: d}, {name: d}]
    tenant-resource-limits: [{tenant-name: t}, {tenant-name: t}]
    providers:
      - name: p
        driver: simulated
        cloud-images: [{name: c}, {name: c}]
        diskimages: [{name: d}, {name: d}]
        pools:
          - name: main
            labels:
              - {name: a, cloud-image: c}
              - {name: a, cloud-image: c}
          - name: main
      - name: p
        driver: simulated
    """
    problems = problems_of(tmp_path, body)
    assert_problem(problems, "labels[1].name", "duplicate label name 'a'")
    assert_problem(problems, "diskimages[1].name", "duplicate diskimage name 'd'")
    assert_problem(problems, "tenant-resource-limits[1].tenant-name", "duplicate tenant 't'")
    assert_problem(problems, "providers[0].cloud-images[1].name", "duplicate cloud-image 'c'")
    assert_problem(problems, "providers[0].diskimages[1].name", "duplicate diskimage 'd'")
    assert_problem(problems, "providers[0].pools[0].labels[1].name", "duplicate label 'a'")
    assert_problem(problems, "providers[0].pools[1].name", "duplicate pool name 'main'")
    assert_problem(problems, "providers[1].name", "duplicate provider name 'p'")


def test_reference_checks(tmp_path):
    body = """\
    labels: [{name: small}, {name: big}, {name: both}, {name: none}, {name: orphan}]
    diskimages:
      - {name: debian}
      - {name: template, abstract: true}
      - {name: unused}
    providers:
      - name: p
        driver: simulated
        diskimages: [{name: debian}, {name: ubuntu}, {name: template}]
        cloud-images: [{name: stock}]
        pools:
          - name: main
            labels:
              - {name: smal, cloud-image: stock}
              - {name: big, cloud-image: stok}
              - {name: both, cloud-image: stock, diskimage: debian}
              - {name: none}
              - {name: orphan, diskimage: unused}
              - {name: small, diskimage: nowhere}
    """
    problems = problems_of(tmp_path, body)
    lbl = "providers[0].pools[0].labels"
    assert_problem(problems, f"{lbl}[0].name",
                   "label 'smal' is not in the top-level labels (did you mean 'small'?)")
    assert_problem(problems, f"{lbl}[1].cloud-image",
                   "cloud-image 'stok' is not in the cloud-images of provider 'p' "
                   "(did you mean 'stock'?)")
    assert_problem(problems, f"{lbl}[2]", "either diskimage or cloud-image, not both")
    assert_problem(problems, f"{lbl}[3]", "one of diskimage or cloud-image is required")
    assert_problem(problems, f"{lbl}[4].diskimage",
                   "'unused' is not in the diskimages of provider 'p' (it is only in the "
                   "top-level diskimages)")
    assert_problem(problems, f"{lbl}[5].diskimage", "nor in the top-level diskimages")
    assert_problem(problems, "providers[0].diskimages[1].name",
                   "diskimage 'ubuntu' is not in the top-level diskimages")
    assert_problem(problems, "providers[0].diskimages[2].name", "abstract")
    assert len(problems) == 8


def test_labels_no_pool_provides_are_warnings(tmp_path):
    body = SIM_PROVIDER.replace("- name: small\n", "- name: small\n  - name: lonely\n"
                                "    min-ready: -1\n", 1)
    path = write(tmp_path, body)
    config = load_config(path)
    assert config.labels["lonely"].min_ready == 0
    assert any("'lonely' is not provided by any pool" in w for w in config.warnings)
    assert any("min-ready -1 acts like 0" in w for w in config.warnings)
    report = validate_config(path)
    assert report == [] and report.problems == []
    assert report.warnings == config.warnings


def test_tenant_limit_near_miss_is_a_warning(tmp_path):
    body = "tenant-resource-limits:\n  - tenant-name: t\n    max-server: 3\n"
    config = load_config(write(tmp_path, body))
    assert config.tenant_limits["t"].limits == {"max-server": 3}
    assert any("did you mean 'max-servers'?" in w for w in config.warnings)


def test_validate_config_lists_problem_lines(tmp_path):
    path = write(tmp_path, "labels:\n  - name: a\n    min-ready: lots\nproviders: 7\n")
    report = validate_config(path)
    assert sorted(report) == [f"{path}: labels[0].min-ready: expected int",
                              f"{path}: providers: expected a list"]
    assert validate_config(tmp_path / "absent.yaml") == [
        f"{tmp_path}/absent.yaml: file does not exist"]


# -- diskimages -----------------------------------------------------------------------------------

def test_diskimage_inheritance(tmp_path):
    config = load_config(write(tmp_path, FULL))
    base, debian = config.diskimages["base"], config.diskimages["debian"]
    assert base.abstract and not debian.abstract
    assert list(config.buildable_images()) == ["debian"]
    assert isinstance(debian, DiskImage)
    assert debian.elements == ["vm", "simple-init", "debian-minimal"]
    assert debian.env_vars == {"DIB_A": "1", "DIB_B": "two"}
    assert debian.release == "12" and base.release == "12"
    assert debian.metadata == {} and base.metadata == {"owner": "ci"}
    assert debian.rebuild_age == 3600 and base.rebuild_age == 86400
    assert debian.parent == "base"
    # explicit formats, then the format of every provider that uses the image
    assert debian.formats == ["raw", "qcow2"]
    assert base.formats == []


def test_inheritance_chain_and_defaults():
    entries = [
        {"name": "a", "abstract": True, "elements": ["x"], "dib-cmd": "dib", "pause": True},
        {"name": "b", "parent": "a", "elements": ["y"], "pause": False, "metadata": {"k": 1}},
        {"name": "c", "parent": "b", "elements": ["z"], "env-vars": {"E": "1"}},
    ]
    images, problems = resolve_diskimages(entries)
    assert problems == []
    c = images["c"]
    assert c["elements"] == ["x", "y", "z"] and c["dib-cmd"] == "dib"
    assert c["pause"] is False and c["abstract"] is False and c["metadata"] == {}
    assert c["build-timeout"] == 28800 and c["username"] == "zuul"
    assert images["a"]["abstract"] is True


def test_unknown_and_cyclic_parents(tmp_path):
    body = """\
    diskimages:
      - {name: a, parent: b}
      - {name: b, parent: a}
      - {name: c, parent: debain}
      - {name: debian}
      - {name: self, parent: self}
    """
    problems = problems_of(tmp_path, body)
    assert_problem(problems, "diskimages[1].parent", "parent chain is cyclic: a -> b -> a")
    assert_problem(problems, "diskimages[2].parent",
                   "unknown parent diskimage 'debain' (did you mean 'debian'?)")
    assert_problem(problems, "diskimages[4].parent", "cyclic: self -> self")


# -- environment substitution and the secure file -------------------------------------------------

def test_environment_substitution(tmp_path, monkeypatch):
    monkeypatch.setenv("NODEPOOL_ZK_HOST", "zk.internal")
    monkeypatch.setenv("HOME_PORT", "1")
    body = ("zookeeper-servers:\n  - host: '%(NODEPOOL_ZK_HOST)'\n"
            "providers: []\nlabels: []\nimages-dir: '/img/%(HOME_PORT)'\n")
    config = load_config(write(tmp_path, body))
    assert config.zookeeper_servers[0].host == "zk.internal"
    assert config.images_dir == "/img/%(HOME_PORT)"     # only NODEPOOL_ names are replaced


def test_unset_environment_variables_are_named(tmp_path, monkeypatch):
    monkeypatch.delenv("NODEPOOL_NOT_SET", raising=False)
    monkeypatch.delenv("NODEPOOL_ALSO_NOT", raising=False)
    problems = problems_of(tmp_path, "labels: []\nimages-dir: '%(NODEPOOL_NOT_SET)'\n"
                                     "elements-dir: '%(NODEPOOL_ALSO_NOT)'\n")
    assert problems == [("", "line 2: environment variable NODEPOOL_NOT_SET is not set"),
                        ("", "line 3: environment variable NODEPOOL_ALSO_NOT is not set")]


def test_substitute_env_is_pure():
    text, problems = substitute_env("a: %(NODEPOOL_X)%(NODEPOOL_X)\n", {"NODEPOOL_X": "1"})
    assert (text, problems) == ("a: 11\n", [])


SECURE = """\
zookeeper-servers:
  - host: secret-zk
    port: 2999
zookeeper-tls:
  ca: certs/ca.pem
  cert: certs/c.pem
  key: certs/c.key
diskimages:
  - name: debian
    env-vars:
      DIB_PASSWORD: hunter2
      DIB_B: secret
"""


def test_secure_file_is_merged(tmp_path):
    main = write(tmp_path, FULL)
    (tmp_path / "private").mkdir()
    secure = write(tmp_path, SECURE, "private/secure.yaml")
    config = load_config(main, secure)
    assert [(s.host, s.port) for s in config.zookeeper_servers] == [("secret-zk", 2999)]
    assert config.zookeeper_tls.ca == str(tmp_path / "private" / "certs" / "ca.pem")
    assert config.diskimages["debian"].env_vars == {"DIB_A": "1", "DIB_B": "secret",
                                                    "DIB_PASSWORD": "hunter2"}
    assert set(config.source_mtimes) == {main, secure}


def test_secure_file_problems_name_the_secure_file(tmp_path):
    main = write(tmp_path, FULL)
    secure = write(tmp_path, SECURE.replace("name: debian", "name: debain") + "labels: []\n",
                   "secure.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(main, secure)
    assert info.value.path == secure
    assert info.value.problems == [("labels", "unknown key")]
    secure = write(tmp_path, SECURE.replace("name: debian", "name: debain"), "secure.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(main, secure)
    assert info.value.problems == [("diskimages[0].name", "diskimage 'debain' is not in the "
                                    "main config (did you mean 'debian'?)")]
    # both files wrong: one error for the main file, the secure file's problems name it
    bad_main = write(tmp_path, FULL + "bogus: 1\n", "bad.yaml")
    secure = write(tmp_path, SECURE + "labels: []\n", "secure.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(bad_main, secure)
    assert info.value.path == bad_main
    assert info.value.problems == [("bogus", "unknown key"),
                                   (f"{secure}: labels", "unknown key")]
    assert validate_config(bad_main, secure) == [f"{bad_main}: bogus: unknown key",
                                                 f"{secure}: labels: unknown key"]
    assert validate_config(main, tmp_path / "nope.yaml") == [
        f"{tmp_path}/nope.yaml: file does not exist"]


# -- the driver hooks -----------------------------------------------------------------------------

class TinyDriver(Driver):
    """A driver with keys at every level, its own defaults, checks and finalize step."""
    name = "tiny"
    provider_defaults = {"rate": 7.0, "boot-timeout": 5}
    labels_need_image = False

    def __init__(self):
        self.finalized = []

    def provider_schema(self):
        return {v.Required("endpoint"): str,
                v.Optional("image-format", default="raw"): str,
                v.Optional("regions", default=[]): [{v.Required("name"): str,
                                                      v.Optional("weight", default=1): int}]}

    def pool_schema(self):
        return {v.Optional("subnet", default="default"): str}

    def label_schema(self):
        return {v.Required("flavor"): str}

    def diskimage_schema(self):
        return {v.Optional("volume-size", default=8): int}

    def cloud_image_schema(self):
        return {v.Optional("image-id"): str}

    def check_provider(self, provider, config):
        if provider.options["endpoint"] == "forbidden":
            return [("endpoint", "this endpoint is refused")]
        return []

    def finalize(self, provider, config):
        self.finalized.append(provider.name)
        provider.options["finalized"] = True
        pool = provider.pools["main"]       # a driver may make pool labels of its own
        pool.labels["extra"] = PoolLabel("extra", pool.name, provider.name)

    def adapter(self, provider, rate_limiter=None):
        raise NotImplementedError


@pytest.fixture
def tiny(monkeypatch):
    driver = TinyDriver()
    monkeypatch.setitem(drivers._cache, "tiny", driver)
    return driver


TINY = """\
labels: [{name: small}, {name: built}, {name: extra}]
diskimages: [{name: debian, formats: [vhd]}]
providers:
  - name: t
    driver: tiny
    endpoint: https://cloud.example
    regions: [{name: r1}, {name: r2, weight: 3}]
    diskimages: [{name: debian}]
    pools:
      - name: main
        labels:
          - {name: small, flavor: s1}
          - {name: built, flavor: m1, diskimage: debian}
"""


def test_driver_hooks_extend_the_schema(tmp_path, tiny):
    config = load_config(write(tmp_path, TINY))
    prov = config.providers["t"]
    assert prov.options == {"endpoint": "https://cloud.example", "image-format": "raw",
                            "regions": [{"name": "r1", "weight": 1}, {"name": "r2", "weight": 3}],
                            "finalized": True}
    assert (prov.rate, prov.boot_timeout, prov.launch_timeout) == (7.0, 5, 3600)
    assert prov.pools["main"].options == {"subnet": "default"}
    assert prov.pools["main"].labels["small"].options == {"flavor": "s1"}
    assert prov.pools["main"].labels["small"].cloud_image is None   # allowed by this driver
    assert prov.diskimages["debian"].options == {"volume-size": 8}
    assert config.diskimages["debian"].formats == ["vhd", "raw"]
    assert tiny.finalized == ["t"]
    assert config.warnings == []       # 'extra' is served: finalize() made its pool label
    assert prov.raw["regions"][0] == {"name": "r1", "weight": 1}


def test_driver_keys_are_validated_with_suggestions(tmp_path, tiny):
    body = (TINY.replace("endpoint: https://cloud.example", "endpont: x")
            .replace("{name: r2, weight: 3}", "{name: r2, wieght: 3}, {name: r3, weight: no}")
            .replace("{name: small, flavor: s1}", "{name: small, flavour: s1}"))
    problems = problems_of(tmp_path, body)
    assert_problem(problems, "providers[0].endpoint", "required key is missing")
    assert_problem(problems, "providers[0].endpont", "did you mean 'endpoint'?")
    assert_problem(problems, "providers[0].regions[1].wieght", "did you mean 'weight'?")
    assert_problem(problems, "providers[0].regions[2].weight", "expected int")
    assert_problem(problems, "providers[0].pools[0].labels[0].flavour", "did you mean 'flavor'?")
    assert_problem(problems, "providers[0].pools[0].labels[0].flavor", "required key")
    assert not tiny.finalized


def test_driver_check_provider_problems(tmp_path, tiny):
    problems = problems_of(tmp_path, TINY.replace("https://cloud.example", "forbidden"))
    assert problems == [("providers[0].endpoint", "this endpoint is refused")]
    assert not tiny.finalized       # finalize runs only on a valid configuration


def test_default_driver_is_openstack(tmp_path):
    problems = problems_of(tmp_path, "providers:\n  - name: cloud1\n")
    assert_problem(problems, "providers[0].cloud", "required key is missing")


MISSING_CLOUD = """\
labels:
  - name: small
  - name: os-small
providers:
  - name: sim
    driver: simulated
    cloud-images:
      - name: img
    pools:
      - name: main
        labels:
          - name: small
            cloud-image: img
  - name: gone
    driver: openstack
    cloud: no-such-cloud
    cloud-images:
      - name: cirros
    pools:
      - name: main
        labels:
          - name: os-small
            cloud-image: cirros
            min-ram: 512
"""


def test_a_provider_s_missing_cloud_leaves_the_config_valid(tmp_path, monkeypatch):
    """Credentials are the host's, not the file's: a cloud this host cannot load is that
    provider's start error (and ``config-validate --check-clouds``'s report), never the whole
    configuration's."""
    empty = tmp_path / "clouds.yaml"
    empty.write_text("clouds: {}\n")
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(empty))
    path = write(tmp_path, MISSING_CLOUD)
    config = load_config(path)
    assert sorted(config.providers) == ["gone", "sim"]
    assert list(validate_config(path).problems) == []
    [problem] = drivers.cloud_problems(config)
    assert problem.startswith("provider gone: ") and "no-such-cloud" in problem


# -- daemon intervals -----------------------------------------------------------------------------

def test_daemon_intervals_default_to_nodepools_and_can_be_shortened(tmp_path):
    default = load_config(write(tmp_path, SIM_PROVIDER))
    assert (default.launcher.leak_interval, default.builder.build_interval,
            default.builder.upload_interval, default.builder.cleanup_interval) == (60, 10, 10, 60)
    short = load_config(write(tmp_path, SIM_PROVIDER + textwrap.dedent("""\
        launcher:
          leak-interval: 0.5
        builder:
          build-interval: 1
          upload-interval: 2
          cleanup-interval: 0.25
        """)))
    assert short.launcher.leak_interval == 0.5
    assert (short.builder.build_interval, short.builder.upload_interval,
            short.builder.cleanup_interval) == (1, 2, 0.25)


def test_daemon_intervals_must_be_positive_numbers_under_known_keys(tmp_path):
    problems = problems_of(tmp_path, SIM_PROVIDER + textwrap.dedent("""\
        launcher:
          leak-interval: 0
          cleanup-intervl: 3
        builder:
          cleanup-interval: yes
          upload-interval: -1
        """))
    assert_problem(problems, "launcher.leak-interval", "must be > 0")
    assert_problem(problems, "launcher.cleanup-intervl", "unknown key")
    assert_problem(problems, "builder.cleanup-interval", "expected a number")
    assert_problem(problems, "builder.upload-interval", "must be > 0")


ROLLOUT_CONFIG = """\
labels:
  - name: jammy
diskimages:
  - name: base
    abstract: true
    rollout:
      validation:
        command: test -x /usr/bin/python3
        key-file: keys/validate
      steps: [10, 50, 100]
      step-min-launches: 20
      fallback:
        margin: 0.3
  - name: ubuntu
    parent: base
providers:
  - name: sim
    driver: simulated
    diskimages:
      - name: ubuntu
        rollout:
          steps: [100]
    pools:
      - name: main
        labels:
          - name: jammy
            diskimage: ubuntu
  - name: other
    driver: simulated
    diskimages:
      - name: ubuntu
    pools: []
"""


def test_rollout_policy_is_inherited_and_overridden_per_provider(tmp_path):
    from nodepool.config.rollout import policy_for
    config = load_config(write(tmp_path, ROLLOUT_CONFIG))
    other = policy_for(config, "ubuntu", "other")
    assert other.steps == (10, 50, 100) and other.step_min_launches == 20
    assert other.fallback_margin == 0.3 and other.fallback_min_launches == 10
    assert other.validation.key_file == str(tmp_path / "keys" / "validate")
    assert other.validation.attempts == 2 and other.validation.timeout == 600
    own = policy_for(config, "ubuntu", "sim")
    assert own.steps == (100,) and own.validation is None
    assert policy_for(config, "ubuntu", "nowhere") is not None     # the diskimage's


def test_rollout_problems_name_the_key(tmp_path):
    body = (ROLLOUT_CONFIG.replace("        key-file: keys/validate\n", "")
            .replace("steps: [10, 50, 100]", "steps: [50, 10]")
            .replace("margin: 0.3", "margin: 3")
            .replace("          steps: [100]", "          stepz: [100]"))
    problems = problems_of(tmp_path, body)
    assert_problem(problems, "diskimages[0].rollout.fallback.margin", "between 0 and 1")
    assert_problem(problems, "providers[0].diskimages[0].rollout.stepz",
                   "did you mean 'steps'")
    body = ROLLOUT_CONFIG.replace("        key-file: keys/validate\n", "").replace(
        "steps: [10, 50, 100]", "steps: [50, 10]")
    problems = problems_of(tmp_path, body)
    assert_problem(problems, "diskimages[0].rollout.validation.key-file", "required with")
    assert_problem(problems, "diskimages[0].rollout.steps", "increasing")
    assert_problem(problems, "diskimages[0].rollout.steps", "last step must be 100")
    # the child inheriting the policy does not repeat its parent's problems
    assert not [k for k, _ in problems if k.startswith("diskimages[1]")], problems
