"""The one base class of the errors vitlab raises about what the user gave it.

Data that is missing or malformed, config values out of range, weights that cannot be found or
fetched, checkpoints that are not ours or not trusted, a run directory another process owns:
each is a ``VitlabUserError`` (besides its usual built-in base, so ``except ValueError`` still
works). The command-line entry points (``vitlab.runtime.cli``) print its message as one block and exit
with code 2; anything else is a bug and keeps its traceback. ``HYDRA_FULL_ERROR=1`` shows the
traceback of user errors too.
"""
from __future__ import annotations

import functools
import os
import sys

EXIT_USER_ERROR = 2  # as argparse and Hydra's own command-line errors: "usage error"


class VitlabUserError(Exception):
    """An error the user fixes (the message says how), not a bug in vitlab."""


def user_error_in(err: BaseException) -> VitlabUserError | None:
    """``err`` or the user error it was raised from (a library may wrap ours, e.g. a DataLoader worker's)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, VitlabUserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def user_errors_as_messages(body):
    """For the command-line entry points (``vitlab.runtime.cli``, ``vitlab.tools.predict``): run
    ``body``; a user error becomes its message on stderr and exit code 2 (SystemExit passes through
    Hydra's error reporting, which would print a traceback for an exception)."""

    @functools.wraps(body)
    def run(cfg):
        try:
            return body(cfg)
        except Exception as err:
            user = user_error_in(err)
            if user is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"\nError ({type(user).__name__}): {user}\n(HYDRA_FULL_ERROR=1 shows the traceback)",
                  file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return run
