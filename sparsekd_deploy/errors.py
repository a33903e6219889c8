"""Typed, user-facing errors. The CLI prints their message on one line and exits 2 (usage) or 1 (verdict).

Each message says what was wrong, what is allowed, and how to fix it.
"""

from __future__ import annotations


class SparseKDError(ValueError):
    """Base class: a problem the user can fix. Never shown with a traceback."""

    exit_code = 2


class ConfigError(SparseKDError):
    """One or more configuration problems, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class TeacherNotFoundError(SparseKDError):
    pass


class DataError(SparseKDError):
    pass


class PatternError(SparseKDError):
    pass


class OutputExistsError(SparseKDError):
    pass


class NonFiniteLossError(SparseKDError):
    """Raised inside a stage; the loop catches it, stops and keeps the last accepted stage."""

    exit_code = 1


class IntegrityError(SparseKDError):
    """A pruned weight is not exactly zero (masks were not enforced)."""

    exit_code = 1


class ModelLoadError(SparseKDError):
    """A model (or tokenizer) dir that exists but cannot be loaded as it is: corrupt, incomplete or not a causal LM."""
