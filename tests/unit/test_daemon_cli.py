"""The daemon commands hand the config's intervals to the daemons they construct."""
import textwrap

import pytest

import nodepool.builder.builder as builder_module
import nodepool.launcher.launcher as launcher_module
from nodepool.cli import builder as builder_cli
from nodepool.cli import launcher as launcher_cli

CONFIG = """\
embedded-store:
  path: {tmp}/state.sqlite
images-dir: {tmp}/images
launcher:
  leak-interval: 1.5
builder:
  build-interval: 0.5
  upload-interval: 0.75
  cleanup-interval: 2
"""


@pytest.fixture
def constructed(monkeypatch):
    """Replace run_daemon: record the daemon object instead of starting it."""
    seen = []
    monkeypatch.setattr(launcher_cli, "run_daemon", lambda prog, daemon, pidfile: seen.append(
        daemon) or 0)
    monkeypatch.setattr(builder_cli, "run_daemon", lambda prog, daemon, pidfile: seen.append(
        daemon) or 0)
    return seen


def write(tmp_path, text):
    path = tmp_path / "nodepool.yaml"
    path.write_text(textwrap.dedent(text).format(tmp=tmp_path))
    return str(path)


def test_launcher_cli_takes_the_leak_interval_from_the_config(tmp_path, constructed):
    assert launcher_cli.main(["-f", "-c", write(tmp_path, CONFIG), "--no-webapp"]) == 0
    [launcher] = constructed
    assert isinstance(launcher, launcher_module.Launcher)
    assert launcher.leak_interval == 1.5


def test_builder_cli_takes_its_intervals_from_the_config(tmp_path, constructed):
    assert builder_cli.main(["-f", "-c", write(tmp_path, CONFIG)]) == 0
    [builder] = constructed
    assert isinstance(builder, builder_module.Builder)
    assert (builder.build_interval, builder.upload_interval, builder.cleanup_interval) == \
        (0.5, 0.75, 2)


@pytest.mark.parametrize("cli", [launcher_cli, builder_cli])
def test_daemon_cli_refuses_an_invalid_config_before_starting(tmp_path, constructed, capsys,
                                                               cli):
    path = write(tmp_path, CONFIG.replace("leak-interval: 1.5", "leak-interval: 0"))
    assert cli.main(["-f", "-c", path]) == 1
    assert constructed == []
    err = capsys.readouterr().err
    assert "invalid configuration" in err and "launcher.leak-interval" in err
