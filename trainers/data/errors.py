"""Errors raised by the data loaders."""


class DataUnavailableError(RuntimeError):
    """Missing or insufficient training data.

    The message names what is missing and the fix: the Debian package to install, or
    the path or option (``--data-dir``, ``text_files``) to set.
    """
