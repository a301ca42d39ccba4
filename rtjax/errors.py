"""Errors raised for bad user inputs (files, folders, label maps).

Every problem with something a user hands to rtjax is reported as one :class:`InputError`
that names the offending file and says what is wrong with it, so that a cohort run can log
the failing case and move on.
"""

from __future__ import annotations

from os import PathLike

__all__ = ["InputError"]


class InputError(ValueError):
    """A user-supplied input (file, folder or array) is unusable.

    ``str(err) == f"{path}: {problem}"``; when there is no file to name (``path is None``,
    e.g. an in-memory array) the message is just ``problem``.

    Attributes:
        path: the offending file or folder (``str``, ``Path`` or ``None``).
        problem: what is wrong with it, in words.
    """

    def __init__(self, path: str | PathLike[str] | None, problem: str) -> None:
        # Both arguments go to ValueError so that the error pickles (cohort workers).
        super().__init__(path, problem)
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        if self.path is None:
            return self.problem
        return f"{self.path}: {self.problem}"
