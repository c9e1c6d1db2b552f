

def test_launcher_process_and_cli_process(sqlite_launcher_env, statsd_listener):
    """The daemon as operators run it reads STATSD_HOST/PORT from its environment; the CLI, as
    another process, reads the waits that daemon recorded."""
    import subprocess
    import sys
    from fixtures.launcher import REPO
    env = sqlite_launcher_env
    env.write(CONFIG)
    env.spawn_launcher()
    client = env.client()
    fulfil_and_return(client, ["big"])
    statsd_listener.wait_for("nodepool.launch.provider.sim.ready",
                             "nodepool.request_wait.label.big.cold", "nodepool.nodes.ready")

    def wait_times():
        proc = subprocess.run(
            [sys.executable, "-m", "nodepool.cli.nodepool", "-c", env.config_path,
             "wait-times", "--by-provider"], capture_output=True, text=True, timeout=60,
            env=dict(os.environ, PYTHONPATH=REPO))
        assert proc.returncode == 0, proc.stderr
        return proc.stdout
    out = wait_until(lambda: "big" in (text := wait_times()) and text, timeout=20,
                     interval=0.5, message="wait-times shows the request")
    row = next(line for line in out.splitlines() if "| big" in line)
    assert "| sim" in row and "0% (0/1)" in row
