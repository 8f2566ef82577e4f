"""The one exception family of mocohub.

Every failure a user can cause or fix raises a :class:`MocohubError` whose
message is one sentence saying what went wrong and what to do next. The CLI
prints that sentence (no traceback) and exits with a non-zero code.
"""

from __future__ import annotations


class MocohubError(Exception):
    """Base class of the errors mocohub raises on purpose."""

    exit_code = 1


class ConfigError(MocohubError, ValueError):
    """A setting, or a combination of settings, that cannot work."""

    exit_code = 2


class InputError(MocohubError, ValueError):
    """Data handed to mocohub (tensors, files, folders) that it cannot use."""

    exit_code = 2


class MissingHeadError(InputError):
    """The projection head was asked for (``head=True``) but the weights hold none."""


class DistributedError(MocohubError, RuntimeError):
    """The processes of a distributed run disagree, or cannot be set up."""
