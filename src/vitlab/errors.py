"""The one base class of the errors vitlab raises about what the user gave it.

Data that is missing or malformed, config values out of range, weights that cannot be found or
fetched, checkpoints that are not ours or not trusted, a run directory another process owns:
each is a ``VitlabUserError`` (besides its usual built-in base, so ``except ValueError`` still
works). The command-line entry points (``vitlab.cli``) print its message as one block and exit
with code 2; anything else is a bug and keeps its traceback. ``HYDRA_FULL_ERROR=1`` shows the
traceback of user errors too.
"""
from __future__ import annotations

EXIT_USER_ERROR = 2  # as argparse and Hydra's own command-line errors: "usage error"


class VitlabUserError(Exception):
    """An error the user fixes (the message says how), not a bug in vitlab."""
