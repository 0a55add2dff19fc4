"""The errors handsoff raises for a user's mistake, as opposed to a bug.

Every one derives from ``HandsoffError``; the command line prints its message as one line (file or option, what
is wrong, how to fix it) and exits 1, and shows a traceback only with ``--debug``. Each also derives from the
built-in exception it refines (``ValueError``, ``FileExistsError``, ...), so code that catches those keeps
working. Stage-specific errors (``DatasetError``, ``CheckpointError``, ``TrainingError``, ``NonFiniteLossError``)
derive from these.
"""

from __future__ import annotations


class HandsoffError(Exception):
    """Base of every user-facing error; the message names the file or option and what is wrong."""


class UsageError(HandsoffError, ValueError):
    """An option or setting is invalid (out of range, an unknown class or task, a device this machine lacks)."""


class DataError(HandsoffError, ValueError):
    """An input file is missing, unreadable, or holds values handsoff refuses (NaN labels, unknown class ids)."""


class OutputError(HandsoffError, FileExistsError):
    """The output location belongs to something else: a folder handsoff did not write, another kind of model, or
    a run started with other settings or inputs. Nothing there is touched."""


class FolderLocked(HandsoffError, RuntimeError):
    """Another process is writing the same output folder."""


def one_line(error: BaseException) -> str:
    """The error's message on one line (multi-line messages from libraries are joined), for the CLI."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


class MissingInputError(DataError, FileNotFoundError):
    """An input file or folder the command needs does not exist."""
