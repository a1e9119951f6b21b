"""The one base class of errors a user can act on, and the exit code each kind maps to.

Every module raises its own subclass (``ConfigError``, ``DataError``, ``ModelLoadError``,
``TrainingError`` ...) so that callers can catch precisely; the command line catches only
:class:`AlignDistilError` and reads ``exit_code`` and ``label`` from the error itself, so it
needs to import nothing but this module to map failures to exit codes.

Exit codes: 2 for anything the user can fix before work starts (a bad config, a malformed
data line, a missing model); 3 for a run that stopped itself (a non-finite loss).
"""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_DIVERGED = 3


class AlignDistilError(Exception):
    """Base class. ``exit_code``: what the CLI exits with; ``label``: the word it prints before the message."""

    exit_code: int = EXIT_USAGE
    label: str = "error"
