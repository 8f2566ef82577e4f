"""The one exception family of mocohub.

Every failure a user can cause or fix raises a :class:`MocohubError` whose
message is one sentence saying what went wrong and what to do next. The CLI
prints that sentence (no traceback) and exits with a non-zero code.
"""

from __future__ import annotations

import re

__all__ = [
    "ConfigError",
    "DistributedError",
    "InputError",
    "MissingHeadError",
    "MocohubError",
    "Stopped",
    "error_summary",
    "original_message",
]


class MocohubError(Exception):
    """Base class of the errors mocohub raises on purpose.

    The command line prints ``prefix`` and the message, and exits with ``exit_code``.
    """

    exit_code = 1
    prefix = "Error: "


class Stopped(MocohubError):
    """A command stopped by a signal it was sent (SIGTERM, Ctrl-C), after keeping its work.

    A stop that was asked for, not a failure: the command line prints the
    message without "Error:", and exits with 128 + the signal's number.
    """

    prefix = ""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


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


def error_summary(error: BaseException) -> str:
    """The informative part of another library's error message, short enough to
    quote inside one of mocohub's one-sentence errors.

    The first non-empty line (the second when the first only introduces it,
    ending in ``:``, as PyTorch's state-dict errors do), its first sentence, no
    terminal colour codes, at most 160 characters; the error's type when it has
    no message.

    Example:
        >>> error_summary(RuntimeError("Error(s) in loading state_dict:\\n\\tsize mismatch. More."))
        'size mismatch'
    """
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(error).__name__
    line = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
    line = line.split(". ")[0].rstrip(".")  # its first sentence
    return line if len(line) <= 160 else line[:157] + "..."


def original_message(error: BaseException) -> str:
    r"""``error``'s own message, without what a DataLoader worker wrapped around it.

    PyTorch raises an error from a worker process again in the main process, as
    the same type, with the message "Caught X in DataLoader worker process N."
    followed by the worker's whole traceback; the user needs only the last line's
    message. Other errors' messages are returned as they are.

    Example:
        >>> wrapped = InputError(
        ...     "Caught InputError in DataLoader worker process 0.\n"
        ...     "Original Traceback (most recent call last):\n"
        ...     '  File "worker.py", line 1, in <module>\n'
        ...     "mocohub.errors.InputError: a.png is not an image; delete it.\n"
        ... )
        >>> original_message(wrapped)
        'a.png is not an image; delete it.'
    """
    text = str(error)
    name = type(error).__name__
    if not (text.startswith(f"Caught {name} in DataLoader worker") and "\nOriginal " in text):
        return text
    lines = text.rstrip().splitlines()
    for at in range(len(lines) - 1, 0, -1):  # the last "module.Name: message" line
        head, sep, rest = lines[at].partition(": ")
        if sep and head.rsplit(".", 1)[-1] == name:
            return " ".join([rest.strip(), *(line.strip() for line in lines[at + 1 :])]).strip()
    return lines[0]
