"""Tools for the tool-use GRPO tests (name them in a recipe as ``tools: [alignkit.testing.tools:boom]``): each fails
in one way a user's tool can, and the functions below them are what the pre-flight check refuses."""

from __future__ import annotations

import sys
import time


def boom(expression: str):
    """Divide by zero, whatever the expression.

    Args:
        expression: Ignored.
    """
    return 1 / 0


def stall(expression: str):
    """Sleep for 5 s in a loop that swallows every Exception (only a time limit that is not an Exception stops it).

    Args:
        expression: Ignored.
    """
    started = time.time()
    while time.time() - started < 5:  # bounded, so that a thread left running by a test ends by itself
        try:
            time.sleep(0.05)
        except Exception:  # noqa: BLE001, S110 - the point: a tool that hides its own errors
            pass
    return "slept"


def leave(expression: str):
    """Call sys.exit, as a script written for the command line would.

    Args:
        expression: Ignored.
    """
    sys.exit(3)


def undocumented(expression: str):
    return expression


NOT_A_FUNCTION = 42
