"""Typed errors: every failure a user can cause or meet has a class and a plain message.

The demo catches `XVilaError` and shows `str(err)` in the chat; training catches
`MediaError` per sample, skips it and counts it by class name.
"""


class XVilaError(Exception):
    """Base of every error this package raises on purpose."""


class WeightsUnavailableError(XVilaError):
    """Pretrained weights could not be found locally nor fetched from the Hub."""


class ConfigError(XVilaError, ValueError):
    """A config or preset is unknown or inconsistent."""


class ResumeError(XVilaError, ValueError):
    """There is nothing to resume, or a checkpoint or partial output does not fit this run
    (a training phase's checkpoints, a data builder's partial output)."""
