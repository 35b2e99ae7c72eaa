"""User-facing errors.

Library code raises these for bad input; they subclass the standard exceptions a Python caller
expects (``ValueError``, ``FileNotFoundError``). The CLI turns exactly these, and nothing else,
into one line on stderr and exit status 2: anything else is a bug and keeps its traceback.
Every message names the argument, the rule, and the fix.
"""

from __future__ import annotations


class InvalidArgument(ValueError):
    """A value the caller passed breaks a documented rule."""


class MissingFile(FileNotFoundError):
    """A file or folder the caller pointed at does not exist or lacks a required part."""


class ArtifactMismatch(InvalidArgument):
    """An exported artifact does not match the model, versions, device or request at hand."""


class NoSpace(OSError):
    """The disk filled (or a quota ran out) while sdfast wrote an output.

    Raised in place of the writer's own error (``OSError`` ENOSPC / EDQUOT, or a library's
    ``RuntimeError`` quoting "No space left on device") by the atomic writers in ``fsio``, after
    they removed what they had staged: the earlier output, if any, is untouched.
    """


class NumericalError(RuntimeError):
    """The computation produced NaN or inf (fp16 overflow, a broken engine): not a user error."""
