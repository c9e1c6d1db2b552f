"""A one-line progress display for commands that wait, shown only on a terminal.

On a TTY the line is redrawn in place (``\\r`` and erase-to-end-of-line) at most every
``MIN_INTERVAL`` seconds; when the output is piped or redirected nothing is written, so logs and
scripts see only the command's ordinary, final lines."""
import time

MIN_INTERVAL = 0.2
_SPINNER = "|/-\\"


def is_tty(stream):
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    def __init__(self, stream, enabled=None, clock=time.monotonic):
        self.stream = stream
        self.enabled = is_tty(stream) if enabled is None else enabled
        self.clock = clock
        self.started = clock()
        self._last = None
        self._ticks = 0
        self._shown = False

    @property
    def elapsed(self):
        return self.clock() - self.started

    def update(self, text):
        """Redraw the line as ``<spinner> <elapsed> <text>``."""
        if not self.enabled:
            return
        now = self.clock()
        if self._last is not None and now - self._last < MIN_INTERVAL:
            return
        self._last = now
        self._ticks += 1
        spin = _SPINNER[self._ticks % len(_SPINNER)]
        self.stream.write(f"\r\x1b[K{spin} {self.elapsed:5.0f}s  {text}")
        self.stream.flush()
        self._shown = True

    def clear(self):
        """Erase the line (before the command prints its result)."""
        if self.enabled and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.clear()
