"""A progress bar for long estimates, on stderr, only when stderr is a terminal.

The estimators count their work in units they choose (particle-points for importance sampling,
chain-transitions for AIS) and report it with :meth:`Progress.advance`; ``--target-mc-error`` adds
work as it decides to refine points (:meth:`Progress.add`). A disabled progress, or one whose stderr
is not a terminal (a pipe, a file, a test), draws nothing and costs nothing. The bar is tqdm's.
"""

import sys


class Progress:
    """``Progress(enabled, desc)``: a bar on stderr when ``enabled`` and stderr is a terminal."""

    def __init__(self, enabled=False, desc="evaluate"):
        self.bar = None
        if enabled and _isatty(sys.stderr):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=0, desc=desc, leave=False, file=sys.stderr, unit_scale=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")

    def add(self, units, desc=None):
        """More work is planned: ``units`` more."""
        if self.bar is not None:
            self.bar.total += units
            if desc is not None:
                self.bar.set_description_str(desc, refresh=False)
            self.bar.refresh()

    def advance(self, units):
        """``units`` of the planned work are done."""
        if self.bar is not None:
            self.bar.update(units)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


class _Borrowed:
    """A caller's :class:`Progress` in a ``with`` block that leaves it open."""

    def __init__(self, progress):
        self.progress = progress

    def __enter__(self):
        return self.progress

    def __exit__(self, *exc):
        pass


def as_progress(progress):
    """``progress`` as a :class:`Progress`: the caller's own (left open), or a new one for
    ``True``/``False`` (closed at the end of a ``with`` block)."""
    return _Borrowed(progress) if isinstance(progress, Progress) else Progress(bool(progress))


def or_silent(progress):
    """``progress`` itself, or a disabled :class:`Progress` for ``None``: something to report to."""
    return progress if progress is not None else Progress(False)


__all__ = ["Progress", "as_progress", "or_silent"]
