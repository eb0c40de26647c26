"""Errors a user can act on.

Anything raised as an `AlignError` is printed by the CLI as one clear message (no traceback) and the
command exits with status 2. Everything else is a bug and keeps its traceback.
"""


class AlignError(Exception):
    """A problem with the user's input, data, config or environment, explained in the message."""


class DataError(AlignError):
    """A row of an input file that cannot be imported: names the file, line, field and value."""

    def __init__(self, problems: list[str], path: str | None = None):
        self.problems = problems
        self.path = path
        shown = problems[:20]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        head = f"cannot import {path}" if path else "invalid rows"
        super().__init__(f"{head}: nothing was registered.\n  " + "\n  ".join(shown) + more)


class ModelRefError(AlignError):
    """A model reference that does not resolve to a model."""
