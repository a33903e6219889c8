"""Reading a ``profile.json`` (written by ``sparsekd-deploy profile``) for ``distill --sparsify-only-faster``.

Kept in core, apart from the profiler itself (``speedup.py``, which needs the exporters' TensorRT and GPU code),
so that distillation reads a profile without importing anything above it."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SparseKDError


class ProfileError(SparseKDError):
    pass


def _read(profile_json: str | Path) -> tuple[dict[str, float], str]:
    """({layer: measured 2:4 speedup over dense}, where it was measured) from a profile.json."""
    path = Path(profile_json)
    if not path.is_file():
        raise ProfileError(f"profile {path} does not exist; make one with `sparsekd-deploy profile --model DIR`")
    try:
        data = json.loads(path.read_text())
        where = f"{data.get('device', '?')}, {data.get('target', '?')}, {data.get('tokens', '?')} tokens"
        return {name: float(v["speedup"]) for name, v in data["layers"].items()}, where
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise ProfileError(f"{path} is not a profile.json written by `sparsekd-deploy profile`") from None


def slower_layers(profile_json: str | Path, min_speedup: float = 1.0) -> dict[str, str]:
    """From a profile.json: layers where 2:4 does not pay, with the reason (for ``--sparsify-only-faster``)."""
    speedups, where = _read(profile_json)
    return {name: f"2:4 not faster than dense ({x:.2f}x on {where})" for name, x in speedups.items()
            if x < min_speedup}


def dense_tradeoffs(profile_json: str | Path, names: list[str]) -> dict[str, str]:
    """For layers kept dense because they carry load: what keeping each dense costs in speed, per the profile."""
    speedups, where = _read(profile_json)
    out = {}
    for n in names:
        if n not in speedups:
            out[n] = "not in the speed profile"
        elif speedups[n] > 1.0:
            out[n] = f"forgoes its measured 2:4 speedup of {speedups[n]:.2f}x ({where})"
        else:
            out[n] = f"costs no speed: 2:4 is not faster on it ({speedups[n]:.2f}x, {where})"
    return out
