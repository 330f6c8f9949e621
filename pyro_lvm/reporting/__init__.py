"""The HTML report of a fitted run: :func:`write_report` (see :mod:`.write`)."""

from .write import write_report

__all__ = ["write_report"]
