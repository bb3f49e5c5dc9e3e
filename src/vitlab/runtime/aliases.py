"""Where moved modules went: the one supported compatibility path for stored configs.

A checkpoint stores its run config, and with it the dotted ``_target_`` path of every class the
run named; moving a module would break every checkpoint written before. ``current()`` maps an old
path to the new one, and both the class locator (``build.locate``) and the allow-list
(``trust.check_targets``) go through it, so an old checkpoint still evaluates. When a module a
config can name moves, add its old -> new module path here (and keep the entry for good).
"""
from __future__ import annotations

# old module path -> new module path
MOVED: dict[str, str] = {
    "vitlab.callbacks": "vitlab.runtime.callbacks",  # conf/callbacks: LastCheckpoint
    "vitlab.loggers": "vitlab.runtime.loggers",  # conf/logger/csv: ResumableCSVLogger
}


def current(target: str) -> str:
    """``target`` (a module or ``module.Class`` path) with a moved module's old path replaced."""
    for old in sorted(MOVED, key=len, reverse=True):  # the longest (most specific) old path first
        if target == old or target.startswith(old + "."):
            return MOVED[old] + target[len(old):]
    return target
