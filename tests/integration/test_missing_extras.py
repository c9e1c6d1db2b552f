"""A machine without an optional package: the CLI and daemons say in one line which extra to
install (exit code 1), never a traceback.  Each case runs the real entry point in a fresh
interpreter whose ``sys.modules`` marks the package as absent, exactly as if pip never
installed it."""
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROVIDERS = """\
labels:
  - name: small
providers:
  - name: sim
    driver: simulated
    state-file: {dir}/cloud.json
    cloud-images:
      - name: img
    pools:
      - name: main
        labels:
          - name: small
            cloud-image: img
"""
SIM = "embedded-store:\n  path: {dir}/state.sqlite\n" + PROVIDERS


def run_without(packages, entry, args, tmp_path, config):
    path = tmp_path / "nodepool.yaml"
    path.write_text(textwrap.dedent(config).format(dir=tmp_path))
    code = (f"import sys\n"
            f"for name in {list(packages)!r}: sys.modules[name] = None\n"
            f"from nodepool.cli.{entry} import main\n"
            f"sys.exit(main(['-c', {str(path)!r}, *{list(args)!r}]))\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=str(tmp_path), env=env, stdin=subprocess.DEVNULL)


def one_line(result, *fragments):
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


ZK = "zookeeper-servers:\n  - host: 127.0.0.1\n    port: 1\n" + PROVIDERS


@pytest.mark.parametrize("entry,args", [("launcher", ["-f", "--no-webapp"]),
                                        ("builder", ["-f"]),
                                        ("nodepool", ["list"])])
def test_zookeeper_without_kazoo(tmp_path, entry, args):
    config = ZK + (f"images-dir: {tmp_path}/images\n" if entry == "builder" else "")
    line = one_line(run_without(["kazoo"], entry, args, tmp_path, config),
                    "ZooKeeper", "'kazoo'", "pip install 'nodepool-py[zookeeper]'")
    assert line.startswith(("nodepool-launcher: ", "nodepool-builder: ", "nodepool: "))


AWS = SIM + """\
  - name: ec2
    driver: aws
    region-name: us-east-1
    cloud-images:
      - name: ubuntu
        image-id: ami-12345678
    pools:
      - name: main
        labels:
          - name: small
            cloud-image: ubuntu
            instance-type: t3.small
"""

OPENSTACK = SIM + """\
  - name: os
    driver: openstack
    cloud: mycloud
    cloud-images:
      - name: cirros
    pools:
      - name: main
        labels:
          - name: small
            cloud-image: cirros
            min-ram: 512
"""


@pytest.mark.parametrize("packages,config,provider,extra", [
    (["boto3", "botocore"], AWS, "ec2", "aws"),
    (["openstack", "keystoneauth1"], OPENSTACK, "os", "openstack"),
], ids=["aws", "openstack"])
def test_cloud_driver_without_its_sdk(tmp_path, packages, config, provider, extra):
    # the file is valid without the SDK, and the CLI keeps working
    plain = run_without(packages, "nodepool", ["config-validate"], tmp_path, config)
    assert plain.returncode == 0 and "Config is valid" in plain.stdout, plain.stderr
    listed = run_without(packages, "nodepool", ["list"], tmp_path, config)
    assert listed.returncode == 0, listed.stderr
    checked = run_without(packages, "nodepool", ["config-validate", "--check-clouds"],
                          tmp_path, config)
    one_line(checked, f"provider {provider}: ", f"pip install 'nodepool-py[{extra}]'")
