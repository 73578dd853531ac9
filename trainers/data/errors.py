"""Errors raised by the data loaders."""


class DataUnavailableError(RuntimeError):
    """Missing, unreadable or insufficient training data.

    The message is one line that names the file or setting at fault and the fix:
    the Debian package to install, a file to download again, or the study-file
    key of the workload's ``data`` to set (``data.paths``, ``data.root``,
    ``data.tokenizer_path``).
    """


def one_line(error: BaseException) -> str:
    """Return the message of ``error`` with line breaks and runs of spaces
    collapsed, for quoting inside a one-line error."""
    return " ".join(str(error).split())
