"""``nodepool-launcher``: run the launcher daemon."""
import argparse
import logging
import logging.config
import os
import sys

from ..errors import ConfigError, NodepoolError


def setup_logging(debug=False, logconfig=None):
    if logconfig:
        if logconfig.endswith((".yaml", ".yml")):
            import yaml
            with open(logconfig) as f:
                logging.config.dictConfig(yaml.safe_load(f))
        else:
            logging.config.fileConfig(logconfig)
        return
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def write_pidfile(path):
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")


def daemon_parser(prog, description):
    """Options shared by the launcher and builder daemons (Nodepool's spelling)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-c", dest="config", default="/etc/nodepool/nodepool.yaml",
                        help="path to the config file")
    parser.add_argument("-s", dest="secure", help="path to the secure config file")
    parser.add_argument("-l", dest="logconfig", help="path to a logging config file")
    parser.add_argument("-p", dest="pidfile", help="path to a pid file")
    parser.add_argument("-d", dest="debug", action="store_true",
                        help="run in the foreground with debug logging")
    parser.add_argument("-f", dest="foreground", action="store_true",
                        help="run in the foreground")
    return parser


def check_foreground(prog, args):
    """Daemons run in the foreground under a service manager; say so instead of forking."""
    if args.foreground or args.debug:
        return True
    print(f"{prog}: only foreground mode is supported; run it with -f under your service "
          "manager (systemd, supervisord)", file=sys.stderr)
    return False


def load_daemon_config(prog, args):
    """The config the daemon will start with (its intervals are read once, here), or None after
    printing why it is invalid; the daemon loads and watches the file itself afterwards."""
    from ..config import load_config
    try:
        return load_config(args.config, args.secure)
    except ConfigError as exc:
        print(f"{prog}: invalid configuration:\n{exc}", file=sys.stderr)
        return None


def run_daemon(prog, daemon, pidfile):
    """Start a daemon (launcher or builder) and run it until it is stopped; exit code."""
    daemon.install_signal_handlers()
    try:
        daemon.start()
    except ConfigError as exc:
        print(f"{prog}: invalid configuration:\n{exc}", file=sys.stderr)
        return 1
    except NodepoolError as exc:       # store unusable, optional package missing, ...
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    write_pidfile(pidfile)
    daemon.run()
    return 0


def main(argv=None):
    parser = daemon_parser("nodepool-launcher", "Keep pools of ready nodes and serve requests.")
    parser.add_argument("--no-webapp", action="store_true", help="do not serve the status API")
    args = parser.parse_args(argv)
    if not check_foreground("nodepool-launcher", args):
        return 2
    setup_logging(args.debug, args.logconfig)
    config = load_daemon_config("nodepool-launcher", args)
    if config is None:
        return 1
    from ..launcher.launcher import Launcher
    return run_daemon("nodepool-launcher",
                      Launcher(args.config, args.secure, webapp=not args.no_webapp,
                               leak_interval=config.launcher.leak_interval),
                      args.pidfile)


if __name__ == "__main__":
    sys.exit(main())
