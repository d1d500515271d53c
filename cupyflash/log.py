"""The ``cupyflash`` logger: quiet by default, ``CUPYFLASH_LOG=debug`` (or info/warning/error) turns it up.

Library code logs through ``logging.getLogger(__name__)`` (a child of ``cupyflash``). Without the variable
nothing is configured, so an application's own logging setup decides, and warnings still reach stderr
through Python's last-resort handler.
"""
from __future__ import annotations

import logging
import os
import sys

ENV_VAR = "CUPYFLASH_LOG"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_FORMAT = "cupyflash %(levelname)s %(name)s: %(message)s"

logger = logging.getLogger("cupyflash")


def setup(level: str | None = None) -> None:
    """Send ``cupyflash`` logs at ``level`` (default: $CUPYFLASH_LOG) to stderr; no-op when neither is set."""
    level = (level or os.environ.get(ENV_VAR, "")).strip().lower()
    if not level:
        return
    if level not in LEVELS:
        logger.warning("%s=%r is not one of %s; ignoring it", ENV_VAR, level, ", ".join(LEVELS))
        return
    logger.setLevel(LEVELS[level])
    if not any(getattr(h, "_cupyflash", False) for h in logger.handlers):  # idempotent across calls
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._cupyflash = True
        logger.addHandler(handler)
    # We print our own records; passing them on as well would print them twice under a configured root.
    logger.propagate = False
