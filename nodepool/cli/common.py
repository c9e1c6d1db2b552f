"""The subcommand registry and the per-invocation context of the ``nodepool`` CLI.

A subcommand is one function registered with ``@command(...)``; it receives a ``CommandContext``
(lazy config and store, output streams, a clock) and the parsed arguments, and returns an exit
code.  Adding a subcommand, from this package or another module listed in
``nodepool.cli.nodepool.EXTRA_COMMAND_MODULES``, is one decorated function.
"""
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import NodepoolError

LOCK_TIMEOUT = 5          # seconds the CLI waits for a node lock (Nodepool's value)
CLI_LOCK_IDENTIFIER = "nodepool-cli"


class CliError(NodepoolError):
    """An operator mistake or refused action: printed as one line, exit code 1."""


@dataclass
class Command:
    name: str
    func: Callable
    help: str
    arguments: tuple = ()          # ((args, kwargs), ...) for add_argument
    needs_store: bool = True
    aliases: tuple = ()


COMMANDS = {}


def arg(*args, **kwargs):
    """One ``add_argument`` call, for ``@command(arguments=[...])``."""
    return (args, kwargs)


def command(name, help, arguments=(), needs_store=True, aliases=()):
    """Register ``func(ctx, args) -> int`` as the subcommand ``name``."""
    def register(func):
        COMMANDS[name] = Command(name, func, help, tuple(arguments), needs_store, tuple(aliases))
        return func
    return register


@dataclass
class CommandContext:
    """What a subcommand needs, opened on first use and closed by ``close()``."""
    config_path: str
    secure_path: str = None
    out: object = field(default_factory=lambda: sys.stdout)
    err: object = field(default_factory=lambda: sys.stderr)
    stdin: object = field(default_factory=lambda: sys.stdin)
    clock: Callable = time.time
    _config: object = None
    _store: object = None

    @property
    def config(self):
        if self._config is None:
            from ..config import load_config
            self._config = load_config(self.config_path, self.secure_path)
        return self._config

    @property
    def store(self):
        if self._store is None:
            from ..store import open_store
            store = open_store(self.config)
            store.start()
            self._store = store
        return self._store

    def print(self, text=""):
        print(text, file=self.out)

    def warn(self, text):
        print(text, file=self.err)

    def close(self):
        if self._store is not None:
            store, self._store = self._store, None
            store.stop()
