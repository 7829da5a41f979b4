"""The one error hierarchy of Hotspots.

Every failure a user can cause (a bad config, a missing input file, an
unreadable source) raises a subclass of :class:`HotspotsError` with a message
that names what failed and why; the CLI maps them to exit codes.
"""

from __future__ import annotations


class HotspotsError(Exception):
    """Base class of every error Hotspots raises on purpose."""

    exit_code = 1


class ConfigError(HotspotsError):
    """The configuration file is malformed or inconsistent.

    Parameters
    ----------
    key : str
        Dotted path of the offending key (``tilesets.quakes.maxzoom``), or
        ``""`` for the file as a whole.
    reason : str
        What is wrong with it.
    file : str, optional
        The configuration file, for the message.
    """

    exit_code = 2

    def __init__(self, key: str, reason: str, file: str | None = None):
        self.key, self.reason, self.file = key, reason, file
        where = ": ".join(part for part in (file, key) if part)
        super().__init__(f"{where}: {reason}" if where else reason)


class InputPathError(HotspotsError):
    """A source's input path matches nothing, or a mapped column is absent."""

    exit_code = 2


class SourceError(HotspotsError):
    """A source could not be read (per file errors are recorded, not raised)."""


class WarehouseBusyError(HotspotsError):
    """Another process held the warehouse lock for longer than the timeout."""


class PublishError(HotspotsError):
    """A snapshot could not be written (a full disk, a read-only folder); the previous one stays published."""


class PlanError(HotspotsError):
    """A build has no plan (its first step has not run), or names an unknown tileset."""
