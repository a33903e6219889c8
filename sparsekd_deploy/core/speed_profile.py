"""Reading a ``profile.json`` (written by ``sparsekd-deploy profile``) for ``distill --sparsify-only-faster``.

Kept in core, apart from the profiler itself (``speedup.py``, which needs the exporters' TensorRT and GPU code),
so that distillation reads a profile without importing anything above it."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SparseKDError


class ProfileError(SparseKDError):
    pass


def slower_layers(profile_json: str | Path, min_speedup: float = 1.0) -> dict[str, str]:
    """From a profile.json: layers where 2:4 does not pay, with the reason (for ``--sparsify-only-faster``)."""
    path = Path(profile_json)
    if not path.is_file():
        raise ProfileError(f"profile {path} does not exist; make one with `sparsekd-deploy profile --model DIR`")
    bad = ProfileError(f"{path} is not a profile.json written by `sparsekd-deploy profile`")
    try:
        data = json.loads(path.read_text())
        layers = data["layers"]
        where = f"{data.get('device', '?')}, {data.get('target', '?')}, {data.get('tokens', '?')} tokens"
        return {name: f"2:4 not faster than dense ({float(v['speedup']):.2f}x on {where})"
                for name, v in layers.items() if float(v["speedup"]) < min_speedup}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError):
        raise bad from None
