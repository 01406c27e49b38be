"""A failed run of an exported bundle ends with one line: the message that names the file or key at fault.

An exported bundle runs by ``python -m monai.bundle run`` in 3D Slicer's Python or beside a MONAI Label
server, where a user reads the last lines of the output. There, a bad input arrives wrapped in MONAI's
``Failed to evaluate ConfigExpression`` / ``Failed to instantiate component`` / ``applying transform``
chain: a hundred lines whose end names a config expression, not the file. :func:`short_errors` replaces
that traceback with one line, printed last; ``MEDSEG_PEFT_TRACEBACK=1`` keeps the full traceback.

The line is, walking the exception chain (``__cause__``, else ``__context__``) from the outermost error
inwards and passing over MONAI's wrappers, the first message that names a path or a quoted key, since an
error raised on purpose wraps the library's low-level cause with the file it concerns; without one, the
innermost error, where the failure began.

This module is copied into exported bundles (``scripts/bundle_errors.py``, beside ``volume_io.py``) and
imports nothing from medseg_peft.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

TRACEBACK_ENV = "MEDSEG_PEFT_TRACEBACK"
WRAPPERS = ("Failed to evaluate", "Failed to instantiate", "applying transform")  # MONAI's: they name a config item or a transform
_NAMES_SOMETHING = re.compile(r"[\w.~-]*[/\\][\w.-]|'[^'\s]+'|\"[^\"\s]+\"")  # a path (a/b, C:\x) or a quoted key


def error_chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from (``__cause__``, else an unsuppressed ``__context__``), outermost first."""
    chain: list[BaseException] = []
    while err is not None and all(err is not e for e in chain):
        chain.append(err)
        err = err.__cause__ if err.__cause__ is not None else (None if err.__suppress_context__ else err.__context__)
    return chain


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())  # one line, whatever line breaks the message has


def shown_error(err: BaseException) -> BaseException:
    """The exception whose message a user should read (see the module's docstring for the rule)."""
    chain = [e for e in error_chain(err) if not is_wrapper(e)]
    if not chain:  # nothing but wrappers
        return error_chain(err)[-1]
    return next((e for e in chain if _NAMES_SOMETHING.search(one_line(e))), chain[-1])


def error_line(err: BaseException) -> str:
    shown = shown_error(err)
    return f"{type(shown).__name__}: {one_line(shown) or '(no message)'}"


def _excepthook(kind, err, tb, _previous=sys.excepthook):
    if os.environ.get(TRACEBACK_ENV) or not isinstance(err, Exception):  # Ctrl-C and exits keep Python's own output
        return _previous(kind, err, tb)
    try:
        sys.stdout.flush()  # what the run printed before goes first, where both streams share one console
    except (OSError, ValueError):
        pass
    print(f"error: {error_line(err)} ({TRACEBACK_ENV}=1 prints the traceback)", file=sys.stderr, flush=True)


def under_monai_bundle(argv: list[str] | None = None) -> bool:
    """Whether this process is ``python -m monai.bundle`` (not a notebook, a test, a server or the Python API)."""
    argv = sys.argv if argv is None else argv
    return bool(argv) and Path(argv[0]).parts[-2:] == ("bundle", "__main__.py")


def is_wrapper(err: BaseException) -> bool:
    """One of MONAI's wrappers, which name a config item or a transform rather than the cause."""
    return type(err) is RuntimeError and one_line(err).startswith(WRAPPERS)


def short_errors(argv: list[str] | None = None) -> None:
    """Under ``python -m monai.bundle`` only, print an uncaught error as one line, last.

    A MONAI Label server or a notebook that loads the bundle keeps its own error handling."""
    if under_monai_bundle(argv) and sys.excepthook is not _excepthook:
        sys.excepthook = _excepthook
