"""Errors a user can act on, printed as one line naming the file or key, last.

A bundle error arrives wrapped in MONAI's ``Failed to evaluate ConfigExpression`` chain, the cause
40 lines up; :func:`short_errors` prints the message a user should read (:func:`user_error`) as the
last line and keeps the traceback at DEBUG (``MEDSEG_PEFT_TRACEBACK=1`` prints it whole).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from medseg_peft.data.bundle_errors import TRACEBACK_ENV, error_chain, is_wrapper, one_line, under_monai_bundle

log = logging.getLogger("medseg_peft")

USER_ERRORS = (ValueError, OSError, FloatingPointError, TypeError, KeyError, NotImplementedError)
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])


def _written_for_users(err: BaseException) -> bool:
    """Raised by a ``raise`` statement of this package: a message written to name the file or key at fault
    (an error a library raised inside our code, or a bug, keeps its traceback)."""
    import linecache

    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    if not filename.startswith(_PACKAGE_DIR):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise")


def user_error(err: BaseException) -> BaseException | None:
    """The exception whose message a user should read, or None when the whole traceback is needed.

    Along the chain, outermost first: the first error this package raised on purpose (it names the file or
    key, and wraps the library's low-level cause: ``image ... cannot be decoded`` over PIL's ``image file
    is truncated``, ``... is in use by another run`` over ``FileExistsError``); else the innermost error of
    a kind a user can act on (a library's ``FileNotFoundError``); MONAI's ``Failed to evaluate ...``
    wrappers never, since they name a config expression, not the cause."""
    chain = [e for e in error_chain(err) if not is_wrapper(e)]
    for e in chain:
        if _written_for_users(e):
            return e
    for e in reversed(chain):
        if isinstance(e, USER_ERRORS):
            return e
    return None


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception along ``__cause__`` / ``__context__`` (where a wrapped error began)."""
    return error_chain(err)[-1]


def _short_excepthook(kind, err, tb, _previous=sys.excepthook):
    shown = user_error(err)
    if os.environ.get(TRACEBACK_ENV) or shown is None:
        return _previous(kind, err, tb)
    import traceback

    log.debug("full traceback:\n%s", "".join(traceback.format_exception(kind, err, tb)))
    message = one_line(shown) or type(shown).__name__
    print(f"medseg-peft: {type(shown).__name__}: {message} ({TRACEBACK_ENV}=1 prints the traceback)", file=sys.stderr, flush=True)


def short_errors() -> None:
    """Under ``python -m monai.bundle`` only, print a run's error as one line naming its cause, last."""
    if under_monai_bundle() and sys.excepthook is not _short_excepthook:
        sys.excepthook = _short_excepthook


__all__ = ["USER_ERRORS", "root_cause", "short_errors", "user_error"]
