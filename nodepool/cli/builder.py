"""``nodepool-builder``: run the image builder daemon."""
import sys

from ..errors import ConfigError, StoreError
from .launcher import daemon_parser, setup_logging, write_pidfile


def main(argv=None):
    parser = daemon_parser("nodepool-builder",
                           "Build disk images, upload them to providers, delete old ones.")
    parser.add_argument("--build-workers", type=int, default=1, metavar="N",
                        help="number of build workers (default 1)")
    parser.add_argument("--upload-workers", type=int, default=4, metavar="N",
                        help="number of upload workers (default 4)")
    args = parser.parse_args(argv)
    if not (args.foreground or args.debug):
        print("nodepool-builder: only foreground mode is supported; run it with -f under "
              "your service manager (systemd, supervisord)", file=sys.stderr)
        return 2
    if args.build_workers < 1 or args.upload_workers < 1:
        print("nodepool-builder: --build-workers and --upload-workers must be at least 1",
              file=sys.stderr)
        return 2
    setup_logging(args.debug, args.logconfig)
    from ..builder.builder import Builder
    builder = Builder(args.config, args.secure, build_workers=args.build_workers,
                      upload_workers=args.upload_workers)
    builder.install_signal_handlers()
    try:
        builder.start()
    except ConfigError as exc:
        print(f"nodepool-builder: invalid configuration:\n{exc}", file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"nodepool-builder: {exc}", file=sys.stderr)
        return 1
    write_pidfile(args.pidfile)
    builder.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
