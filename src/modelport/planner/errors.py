"""The one error type of the planner.

Every bad input is reported against the command-line flag that carries it, so `modelport plan`
can print one line such as ``--model: unknown preset 'llama-9b'`` and exit 2 with no traceback.
"""

from __future__ import annotations


class PlanError(ValueError):
    """Invalid planner input, tied to the flag the user has to change."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag
        self.message = message
