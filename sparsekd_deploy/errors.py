"""Typed, user-facing errors. The CLI prints their message on one line and exits 2 (usage) or 1 (verdict).

Each message says what was wrong, what is allowed, and how to fix it.
"""

from __future__ import annotations


def first_line(e: BaseException | str, limit: int | None = None) -> str:
    """The first non-empty line of an exception's (or a string's) message, the type's name when there is none; cut to
    ``limit`` characters with an ellipsis (transformers can put 150 model names on one line). For one-line errors
    that quote a library's failure."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    line = lines[0] if lines else type(e).__name__
    return line if limit is None or len(line) <= limit else line[: limit - 1] + "…"


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


class Interrupted(SparseKDError):
    """Ctrl-C where the generic "interrupted" line would mislead: the message says what is on disk and what to run."""

    exit_code = 130


class TeacherCacheError(SparseKDError):
    """A teacher top-K cache made from another teacher, tokenizer or data (its stamp says which), or a damaged one."""


# Packages only the build host's install brings (`[full]`), and the extra that brings each device-side one.
FULL_ONLY = ("torch", "transformers", "optimum", "accelerate", "matplotlib", "onnx", "onnxscript", "tokenizers")
DEVICE_EXTRAS = {"onnxruntime": "device", "cuda": "tensorrt", "asyncssh": "full"}


class MissingDependencyError(SparseKDError):
    """A command needs a package this (lean, device-side) install lacks; the message names the extra to install."""

    def __init__(self, package: str, extra: str):
        self.package, self.extra = package, extra
        what = "the build host's full install" if extra == "full" else f"the [{extra}] extra"
        alt = " (or [gpu] for onnxruntime-gpu)" if extra == "device" else ""
        super().__init__(f"this needs {package}, which is not installed here (it comes with {what}): "
                         f"pip install 'sparsekd-deploy[{extra}]'{alt}")

    @classmethod
    def from_import_error(cls, e: ImportError) -> MissingDependencyError | None:
        """The error for a missing optional package, or None when the missing module is not one of ours to name."""
        root = (getattr(e, "name", None) or "").split(".")[0]
        if root in FULL_ONLY:
            return cls(root, "full")
        if root in DEVICE_EXTRAS:
            return cls("cuda-python" if root == "cuda" else root, DEVICE_EXTRAS[root])
        return None
