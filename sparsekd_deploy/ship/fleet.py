"""Ship to many devices: ``fleet.yaml`` names them; canaries go first, and a failing canary stops the rollout.

    defaults: {user: nvidia, port: 22, path: /opt/models/llama, identity: ~/.ssh/id_ed25519}
    hosts:
      - host: orin-07
      - host: nvidia@orin-08      # user@host also works
        port: 2222
        path: /data/llama
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .remote import HostSpec, ShipError
from .ship import LocalBundle, ShipOptions, ShipResult, ship_to

_KEYS = {"host", "user", "port", "path", "identity", "known_hosts"}


@dataclass(frozen=True)
class Device:
    spec: HostSpec
    path: str | None


def load_fleet(path: str | Path, known_hosts: str | None = None, accept_new_host_key: bool = False) -> list[Device]:
    """Every problem of the file in one message."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ShipError(f"--fleet {p}: " + ("a directory, not a fleet file" if p.is_dir() else "no such file"))
    try:
        doc = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ShipError(f"--fleet {p}: cannot be read ({e.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ShipError(f"--fleet {p} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("hosts"), list) or not doc["hosts"]:
        raise ShipError(f"--fleet {p}: expected a mapping with a non-empty `hosts:` list")
    defaults = doc.get("defaults") or {}
    problems = []
    if not isinstance(defaults, dict):
        problems.append("`defaults:` is not a mapping")
        defaults = {}
    for key in set(defaults) - _KEYS:
        problems.append(f"defaults: unknown key {key!r} (allowed: {', '.join(sorted(_KEYS))})")
    devices = []
    for i, entry in enumerate(doc["hosts"], 1):
        entry = {"host": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not entry.get("host"):
            problems.append(f"hosts[{i}]: needs `host:`")
            continue
        for key in set(entry) - _KEYS:
            problems.append(f"hosts[{i}]: unknown key {key!r} (allowed: {', '.join(sorted(_KEYS))})")
        merged = {**defaults, **entry}
        bad = [k for k in ("host", "user", "path", "identity", "known_hosts")
               if merged.get(k) is not None and not isinstance(merged[k], str)]
        if bad:
            problems.append(f"hosts[{i}]: {', '.join(bad)} must be text")
            continue
        target = str(merged["host"])
        if merged.get("user") and "@" not in target:
            target = f"{merged['user']}@{target}"
        try:
            identity = str(Path(str(merged["identity"])).expanduser()) if merged.get("identity") else None
            kh = merged.get("known_hosts") or known_hosts
            spec = HostSpec.parse(target, port=merged.get("port"), identity=identity,
                                  known_hosts=str(Path(kh).expanduser()) if kh else None,
                                  accept_new_host_key=accept_new_host_key)
        except (ShipError, TypeError, ValueError) as e:
            problems.append(f"hosts[{i}]: {e}")
            continue
        device = Device(spec, merged.get("path"))
        if any((d.spec.host, d.spec.port, d.path) == (spec.host, spec.port, device.path) for d in devices):
            problems.append(f"hosts[{i}]: {spec.label} {device.path or '(default path)'} is listed twice")
            continue
        devices.append(device)
    if problems:
        raise ShipError(f"--fleet {p}: " + "; ".join(problems))
    return devices


async def ship_fleet(bundle: LocalBundle, devices: list[Device], opts: ShipOptions, canary: int = 1,
                     parallel: int = 4, progress: Callable[[Device], Callable[[int], None]] = lambda d: lambda n: None
                     ) -> list[ShipResult]:
    """Canaries (the first ``canary`` devices) ship, build and validate first; if any fails, the rest are not
    touched. Then the others, ``parallel`` at a time; one failing there does not stop the others."""
    if parallel < 1 or canary < 0:
        raise ShipError("--parallel must be ≥ 1 and --canary ≥ 0")
    gate = asyncio.Semaphore(parallel)

    async def one(d: Device) -> ShipResult:
        async with gate:
            return await ship_to(bundle, d.spec, replace(opts, path=d.path or opts.path), progress(d))

    first = await asyncio.gather(*(one(d) for d in devices[:canary]))
    failed = [r for r in first if not r.ok]
    if failed:
        rest = [ShipResult(d.spec.label, d.path or opts.path or bundle.default_path, bundle.version, "skipped",
                           message=f"not touched: canary {failed[0].host} failed") for d in devices[canary:]]
        return [*first, *rest]
    return [*first, *await asyncio.gather(*(one(d) for d in devices[canary:]))]


def fleet_exit_code(results: list[ShipResult]) -> int:
    """0: every device runs the bundle; 2: nothing changed anywhere (every device failed before any step); else 1."""
    if all(r.ok for r in results):
        return 0
    return 2 if all(r.verdict in ("error", "skipped") for r in results) else 1
