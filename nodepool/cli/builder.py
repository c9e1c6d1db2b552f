"""``nodepool-builder``: run the image builder daemon."""
import sys

from .launcher import (check_foreground, daemon_parser, load_daemon_config, run_daemon,
                       setup_logging)


def main(argv=None):
    parser = daemon_parser("nodepool-builder",
                           "Build disk images, upload them to providers, delete old ones.")
    parser.add_argument("--build-workers", type=int, default=1, metavar="N",
                        help="number of build workers (default 1)")
    parser.add_argument("--upload-workers", type=int, default=4, metavar="N",
                        help="number of upload workers (default 4)")
    args = parser.parse_args(argv)
    if args.build_workers < 1 or args.upload_workers < 1:
        print("nodepool-builder: --build-workers and --upload-workers must be at least 1",
              file=sys.stderr)
        return 2
    if not check_foreground("nodepool-builder", args):
        return 2
    setup_logging(args.debug, args.logconfig)
    config = load_daemon_config("nodepool-builder", args)
    if config is None:
        return 1
    from ..builder.builder import Builder
    settings = config.builder
    return run_daemon("nodepool-builder",
                      Builder(args.config, args.secure, build_workers=args.build_workers,
                              upload_workers=args.upload_workers,
                              build_interval=settings.build_interval,
                              upload_interval=settings.upload_interval,
                              cleanup_interval=settings.cleanup_interval),
                      args.pidfile)


if __name__ == "__main__":
    sys.exit(main())
