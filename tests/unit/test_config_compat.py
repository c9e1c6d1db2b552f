"""Files Nodepool 11 accepts load here too, files it refuses are refused here too (issue 15).

Each test is a small config of its own, written to tmp_path and read by the real loader."""
import textwrap

import pytest

from nodepool.config import load_config, validate_config
from nodepool.drivers.static.adapter import expand_slots
from nodepool.errors import ConfigError


def write(tmp_path, body):
    path = tmp_path / "nodepool.yaml"
    path.write_text(textwrap.dedent(body))
    return str(path)


def load(tmp_path, body):
    return load_config(write(tmp_path, body))


def problems(tmp_path, body):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, body))
    return info.value.problems


def has(found, key, fragment):
    return any(k == key and fragment in m for k, m in found)


AWS = """\
labels: [{name: small}, {name: big}]
diskimages: [{name: deb, username: debian}]
providers:
  - name: aws1
    driver: aws
    region-name: us-east-1
%s
"""


def aws(body):
    return AWS % textwrap.indent(textwrap.dedent(body), "    ")


# -- AWS keys Nodepool takes ----------------------------------------------------------------------

def test_aws_fleet_dedicated_host_and_boto3_filters_load(tmp_path):
    config = load(tmp_path, aws("""\
        cloud-images:
          - name: ubuntu
            image-filters:
              - Name: name
                Values: [ubuntu-*]
              - name: architecture
                values: [x86_64]
        pools:
          - name: main
            availability-zone: us-east-1a
            public-ip-address: false
            labels:
              - name: small
                cloud-image: ubuntu
                fleet:
                  instance-types: [t3.small, t3a.small]
                  allocation-strategy: price-capacity-optimized
                use-spot: true
              - name: big
                cloud-image: ubuntu
                instance-type: m5.large
                dedicated-host: true
        """))
    prov = config.providers["aws1"]
    assert prov.cloud_images["ubuntu"].options["image-filters"] == [
        {"name": "name", "values": ["ubuntu-*"]}, {"name": "architecture", "values": ["x86_64"]}]
    pool = prov.pools["main"]
    assert pool.options["public-ipv4"] is False and "public-ip-address" not in pool.options
    assert pool.labels["small"].options["fleet"]["instance-types"] == ["t3.small", "t3a.small"]
    assert pool.labels["big"].options["dedicated-host"] is True


def test_aws_public_ipv4_wins_over_its_old_spelling_and_defaults_true(tmp_path):
    config = load(tmp_path, aws("""\
        cloud-images: [{name: c, image-id: ami-1}]
        pools:
          - name: a
            public-ipv4: true
            public-ip-address: false
            labels: [{name: small, cloud-image: c, instance-type: t3.small}]
          - name: b
            labels: [{name: small, cloud-image: c, instance-type: t3.small}]
        """))
    pools = config.providers["aws1"].pools
    assert pools["a"].options["public-ipv4"] is True
    assert pools["b"].options["public-ipv4"] is True


def test_aws_ebs_direct_and_provider_diskimage_login(tmp_path):
    config = load(tmp_path, aws("""\
        diskimages:
          - name: deb
            import-method: ebs-direct
            username: admin
            python-path: /usr/bin/python3
            shell-type: sh
        pools:
          - name: main
            labels: [{name: small, diskimage: deb, instance-type: t3.small}]
        """))
    image = config.providers["aws1"].diskimages["deb"]
    # ebs-direct needs no S3 bucket
    assert image.options["import-method"] == "ebs-direct"
    assert (image.options["username"], image.options["python-path"],
            image.options["shell-type"]) == ("admin", "/usr/bin/python3", "sh")


def test_aws_fleet_rules(tmp_path):
    found = problems(tmp_path, aws("""\
        cloud-images: [{name: c, image-id: ami-1}]
        pools:
          - name: main
            labels:
              - name: small
                cloud-image: c
                instance-type: t3.small
                fleet: {instance-types: [t3.small], allocation-strategy: prioritized}
              - name: big
                cloud-image: c
                fleet: {instance-types: [t3.small], allocation-strategy: diversified}
        """))
    assert has(found, "providers[0].pools[0].labels[0]",
               "exactly one of instance-type and fleet")
    assert has(found, "providers[0].pools[0].labels[1]",
               "allocation-strategy diversified is not one for on-demand")
    found = problems(tmp_path, aws("""\
        cloud-images: [{name: c, image-id: ami-1}]
        pools:
          - name: main
            labels:
              - name: small
                cloud-image: c
                fleet: {instance-types: [t3.small], allocation-strategy: cheapest}
        """))
    assert has(found, "providers[0].pools[0].labels[0].fleet.allocation-strategy", "")


def test_aws_dedicated_host_rules(tmp_path):
    found = problems(tmp_path, aws("""\
        cloud-images: [{name: c, image-id: ami-1}]
        pools:
          - name: main
            labels:
              - name: small
                cloud-image: c
                instance-type: t3.small
                dedicated-host: true
                use-spot: true
        """))
    key = "providers[0].pools[0].labels[0]"
    assert has(found, key, "dedicated-host cannot be used with use-spot")
    assert has(found, key, "dedicated-host needs the pool's availability-zone")


def test_aws_image_filter_spelled_twice_is_refused(tmp_path):
    found = problems(tmp_path, aws("""\
        cloud-images:
          - name: c
            image-filters: [{name: a, Name: b, values: [x]}]
        pools: []
        """))
    assert has(found, "providers[0].cloud-images[0].image-filters[0].Name", "give name once")


# -- keys Nodepool refuses -------------------------------------------------------------------------

def test_aws_refuses_what_nodepool_refuses(tmp_path):
    found = problems(tmp_path, aws("""\
        use-internal-ip: true
        ignore-provider-quota: true
        cloud-images: [{name: c, image-id: ami-1}]
        diskimages: [{name: deb, import-method: create-volume}]
        object-storage: {bucket-name: b}
        pools:
          - name: main
            availability-zones: [us-east-1a]
            labels: [{name: small, cloud-image: c, instance-type: t3.small}]
        """))
    assert has(found, "providers[0].use-internal-ip", "unknown key")
    assert has(found, "providers[0].ignore-provider-quota", "unknown key")
    assert has(found, "providers[0].diskimages[0].import-method", "ebs-direct")
    assert has(found, "providers[0].pools[0].availability-zones",
               "not used by the aws driver")


STATIC = """\
labels: [{name: small}, {name: big}]
providers:
  - name: st
    driver: static
%s
    pools:
      - name: main
%s
        nodes:
          - name: h1.example.com
            labels: [small]
"""


def test_static_refuses_keys_it_does_not_use(tmp_path):
    provider_keys = textwrap.indent(textwrap.dedent("""\
        rate: 1
        boot-timeout: 10
        launch-timeout: 10
        launch-retries: 2
        image-name-format: x
        diskimages: []
        cloud-images: []"""), "    ")
    pool_keys = textwrap.indent(textwrap.dedent("""\
        max-cores: 1
        max-ram: 1
        availability-zones: [a]
        ignore-provider-quota: true"""), "        ")
    found = problems(tmp_path, STATIC % (provider_keys, pool_keys))
    for key in ("rate", "boot-timeout", "launch-timeout", "launch-retries",
                "image-name-format", "diskimages", "cloud-images"):
        assert has(found, f"providers[0].{key}", "not used by the static driver"), key
    for key in ("max-cores", "max-ram", "availability-zones", "ignore-provider-quota"):
        assert has(found, f"providers[0].pools[0].{key}", "not used by the static driver"), key


def test_static_provider_without_those_keys_loads_with_defaults(tmp_path):
    config = load(tmp_path, STATIC % ("", ""))
    prov = config.providers["st"]
    assert prov.rate == 0 and prov.diskimages == {} and prov.cloud_images == {}
    assert prov.pools["main"].azs == [] and prov.pools["main"].ignore_provider_quota is False


def test_static_same_host_twice_with_other_usernames(tmp_path):
    config = load(tmp_path, """\
        labels: [{name: small}, {name: big}]
        providers:
          - name: st
            driver: static
            pools:
              - name: main
                nodes:
                  - name: h1.example.com
                    labels: [small]
                    username: zuul
                  - name: h1.example.com
                    labels: [big]
                    username: admin
                    max-parallel-jobs: 2
                  - name: h2.example.com
                    labels: [small]
        """)
    prov = config.providers["st"]
    slots = [(ext, node["labels"]) for _, node, _, ext in expand_slots(prov)]
    assert slots == [("zuul@h1.example.com:22#0", ["small"]),
                     ("admin@h1.example.com:22#0", ["big"]),
                     ("admin@h1.example.com:22#1", ["big"]),
                     ("h2.example.com:22#0", ["small"])]
    assert set(prov.pools["main"].labels) == {"small", "big"}


def test_static_same_host_and_username_twice_is_refused(tmp_path):
    found = problems(tmp_path, """\
        labels: [{name: small}]
        providers:
          - name: st
            driver: static
            pools:
              - name: main
                nodes:
                  - {name: h1, labels: [small], username: a}
                  - {name: h1, labels: [small], username: a}
        """)
    assert has(found, "providers[0].pools[0].nodes[1]", "already listed")


# -- OpenStack ------------------------------------------------------------------------------------

def test_openstack_label_image_only_top_level_loads_with_a_warning(tmp_path):
    body = """\
        labels: [{name: small}]
        diskimages: [{name: deb}, {name: other}]
        providers:
          - name: cloud1
            cloud: mycloud
            diskimages: [{name: other}]
            pools:
              - name: main
                labels:
                  - {name: small, diskimage: deb, min-ram: 1024}
        """
    config = load(tmp_path, body)
    assert config.providers["cloud1"].pools["main"].labels["small"].diskimage == "deb"
    assert any("only in the top-level diskimages" in w for w in config.warnings)
    report = validate_config(write(tmp_path, body))
    assert report.problems == [] and report.warnings


def test_openstack_label_image_nowhere_is_still_an_error(tmp_path):
    found = problems(tmp_path, """\
        labels: [{name: small}]
        providers:
          - name: cloud1
            cloud: mycloud
            pools:
              - name: main
                labels: [{name: small, diskimage: nope, min-ram: 1024}]
        """)
    assert has(found, "providers[0].pools[0].labels[0].diskimage", "nor in the top-level")


def test_aws_label_image_only_top_level_stays_an_error(tmp_path):
    found = problems(tmp_path, aws("""\
        pools:
          - name: main
            labels: [{name: small, diskimage: deb, instance-type: t3.small}]
        """))
    assert has(found, "providers[0].pools[0].labels[0].diskimage", "only in the top-level")


# -- values and reporting -------------------------------------------------------------------------

@pytest.mark.parametrize("driver_keys", ["{driver: openstack, cloud: c}",
                                         "{driver: aws, region-name: r}",
                                         "{driver: simulated}"])
def test_quoted_rate_is_coerced(tmp_path, driver_keys):
    config = load(tmp_path, f"""\
        providers:
          - <<: {driver_keys}
            name: p
            rate: "0.5"
        """)
    assert config.providers["p"].rate == 0.5


def test_quoted_rate_that_is_not_a_number(tmp_path):
    found = problems(tmp_path, """\
        providers:
          - name: p
            driver: simulated
            rate: fast
        """)
    assert has(found, "providers[0].rate", "expected a number")


def test_every_problem_in_one_run(tmp_path):
    """A schema problem (null subnet-id) and a cross-check problem (image-id and image-filters)
    are both reported, and so is an unknown label reference elsewhere."""
    found = problems(tmp_path, aws("""\
        cloud-images:
          - name: c
            image-id: ami-1
            image-filters: [{name: name, values: [x]}]
        pools:
          - name: main
            subnet-id: null
            labels:
              - name: small
                cloud-image: c
                instance-type: t3.small
              - name: nosuch
                cloud-image: c
                instance-type: t3.small
        """))
    assert has(found, "providers[0].pools[0].subnet-id", "expected str")
    assert has(found, "providers[0].cloud-images[0]", "exactly one of image-id and image-filters")
    assert has(found, "providers[0].pools[0].labels[1].name", "not in the top-level labels")


def test_cross_checks_about_a_refused_key_are_not_repeated(tmp_path):
    found = problems(tmp_path, """\
        labels: [{name: small}]
        providers:
          - name: cloud1
            cloud: mycloud
            cloud-images: [{name: c}]
            pools:
              - name: main
                labels:
                  - {name: small, cloud-image: 7, min-ram: 1}
        """)
    # the bad value is reported once, not again as "one of diskimage or cloud-image"
    assert [k for k, _ in found] == ["providers[0].pools[0].labels[0].cloud-image"]


@pytest.mark.parametrize("name", ["kubernetes", "openshift", "openshiftpods", "gce", "azure",
                                  "ibmvpc"])
def test_drivers_we_do_not_have_are_unknown(tmp_path, name):
    found = problems(tmp_path, f"""\
        providers:
          - name: p
            driver: {name}
        """)
    assert has(found, "providers[0].driver", f"unknown driver {name!r}")


# -- metastatic -----------------------------------------------------------------------------------

META = """\
labels: [{name: big}, {name: small}, {name: tiny}]
providers:
  - name: sim
    driver: simulated
    cloud-images: [{name: img}]
    pools:
      - name: main
        labels: [{name: big, cloud-image: img}]
  - name: meta
    driver: metastatic
%s
"""


def test_metastatic_label_keys_and_defaults(tmp_path):
    config = load(tmp_path, META % textwrap.indent(textwrap.dedent("""\
        launch-timeout: 600
        pools:
          - name: main
            max-servers: 4
            host-key-checking: false
            labels:
              - name: small
                backing-label: big
                max-parallel-jobs: 3
                grace-time: 120
                min-retention-time: 600
                max-age: 3600
                host-key-checking: true
              - name: tiny
                backing-label: big
                max-parallel-jobs: 3
                grace-time: 120
                min-retention-time: 600
                max-age: 3600
        """), "    "))
    prov = config.providers["meta"]
    assert prov.launch_timeout == 600 and prov.rate == 0
    small = prov.pools["main"].labels["small"].options
    assert (small["backing-label"], small["max-parallel-jobs"], small["grace-time"],
            small["min-retention-time"], small["max-age"], small["host-key-checking"]) == \
        ("big", 3, 120, 600, 3600, True)
    tiny = prov.pools["main"].labels["tiny"].options
    assert "host-key-checking" not in tiny


def test_metastatic_defaults(tmp_path):
    config = load(tmp_path, META % textwrap.indent(textwrap.dedent("""\
        pools:
          - name: main
            labels: [{name: small, backing-label: big}]
        """), "    "))
    opts = config.providers["meta"].pools["main"].labels["small"].options
    assert (opts["max-parallel-jobs"], opts["grace-time"], opts["min-retention-time"],
            opts.get("max-age")) == (1, 60, 0, None)


def test_metastatic_rules(tmp_path):
    found = problems(tmp_path, META % textwrap.indent(textwrap.dedent("""\
        rate: 1
        cloud-images: []
        pools:
          - name: main
            max-cores: 4
            labels:
              - {name: small, backing-label: nope}
              - {name: tiny, backing-label: small}
              - {name: big, backing-label: big, cloud-image: x}
              - {name: small2}
        """), "    "))
    assert has(found, "providers[1].rate", "not used by the metastatic driver")
    assert has(found, "providers[1].cloud-images", "not used by the metastatic driver")
    assert has(found, "providers[1].pools[0].max-cores", "not used by the metastatic driver")
    assert has(found, "providers[1].pools[0].labels[2].cloud-image",
               "not used by the metastatic driver")
    assert has(found, "providers[1].pools[0].labels[3].backing-label", "required key")


def test_metastatic_cross_checks(tmp_path):
    found = problems(tmp_path, META % textwrap.indent(textwrap.dedent("""\
        pools:
          - name: main
            labels:
              - {name: small, backing-label: nope}
              - {name: tiny, backing-label: small}
              - {name: big, backing-label: small, max-parallel-jobs: 2}
        """), "    "))
    assert has(found, "providers[1].pools[0].labels[0].backing-label",
               "backing-label nope is not a top-level label")
    assert has(found, "providers[1].pools[0].labels[1].backing-label",
               "is a label of this metastatic provider itself")
    assert has(found, "providers[1].pools[0].labels[2]", "must agree on max-parallel-jobs")
