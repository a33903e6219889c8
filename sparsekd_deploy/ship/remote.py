"""The SSH transport: one asyncssh connection per device, carrying SFTP (files, renames, symlinks) and the few remote
commands ship needs.

Why asyncssh rather than the system ``ssh``/``scp`` driven as subprocesses: one connection multiplexes SFTP and
command channels (no reconnect per step), the upload can resume at a byte offset and report progress from Python,
host-key decisions (unknown vs *changed* key, ``--accept-new-host-key``) are made here and explained in one line,
and the failure modes arrive as typed exceptions rather than parsed stderr. Paramiko's SFTP is markedly slower on bulk
uploads; asyncssh pipelines many SFTP requests in flight.

Remote commands still pass through the device's login shell (that is how SSH executes commands), so every argument is
quoted with ``shlex.quote`` by ``shell_line``; nothing a user typed is pasted into a command unquoted.
"""

from __future__ import annotations

import getpass
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..errors import SparseKDError


class ShipError(SparseKDError):
    """Connection, authentication, host-key or device-state problem: nothing was changed on the device."""


def shell_line(argv: list[str]) -> str:
    """A command line for the device's POSIX shell in which every argument is one literal word."""
    return " ".join(shlex.quote(str(a)) for a in argv)


@dataclass(frozen=True)
class HostSpec:
    host: str
    user: str
    port: int = 22
    identity: str | None = None
    known_hosts: str | None = None  # default: ~/.ssh/known_hosts (an absent file trusts no host)
    accept_new_host_key: bool = False
    connect_timeout: float = 15.0

    @classmethod
    def parse(cls, target: str, **kw) -> HostSpec:
        """``user@host`` or ``host`` (the local user name)."""
        user, _, host = target.rpartition("@")
        if not host or any(c.isspace() or ord(c) < 32 for c in target) or host.startswith("-"):
            raise ShipError(f"--host {target!r} is not a host; expected user@host or host")
        port = kw.pop("port", None)
        port = 22 if port is None else port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ShipError(f"port {port!r} is not a TCP port (1-65535)")
        return cls(host=host, user=user or getpass.getuser(), port=port, **kw)

    @property
    def label(self) -> str:
        return f"{self.user}@{self.host}" + (f":{self.port}" if self.port != 22 else "")

    @property
    def known_hosts_path(self) -> Path:
        return Path(self.known_hosts or "~/.ssh/known_hosts").expanduser()


# AES-GCM first: with AES instructions (x86 AES-NI, ARMv8 crypto extensions on Jetson) it moves bulk data ~1.6x faster
# than ChaCha20-Poly1305 through asyncssh here (302 vs 190 MB/s on loopback); the rest stay as fallbacks.
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com", "aes128-ctr",
           "aes256-ctr")


def _known_hosts_pattern(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def _client_class(spec: HostSpec, verdict: dict):
    """An asyncssh client that records *why* a host key was not trusted (unknown host vs changed key) and, only with
    ``--accept-new-host-key``, trusts an unknown host and appends its key to the known-hosts file."""
    import asyncssh

    class _Client(asyncssh.SSHClient):
        def validate_host_public_key(self, host, addr, port, key):
            # Called only when the key is not among the known-hosts entries for this host.
            path = spec.known_hosts_path
            known = asyncssh.match_known_hosts(str(path), host, addr, port if port != 22 else None)[0] \
                if path.is_file() else []
            fingerprint = key.get_fingerprint()
            if known:
                verdict["changed"] = fingerprint
                return False
            if not spec.accept_new_host_key:
                verdict["unknown"] = fingerprint
                return False
            path.parent.mkdir(parents=True, exist_ok=True)
            line = f"{_known_hosts_pattern(spec.host, spec.port)} {key.export_public_key('openssh').decode().strip()}\n"
            with open(path, "a") as f:
                f.write(line)
            verdict["added"] = fingerprint
            return True

    return _Client


class _DeadSocketFilter:
    """asyncio logs "socket.send() raised exception." for every write after a link died; ship already reports the
    lost connection in one line, so the repeats are noise."""

    def filter(self, record) -> bool:
        return "socket.send() raised exception" not in record.getMessage()


def _quiet_dead_socket_warnings() -> None:
    import logging

    log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DeadSocketFilter) for f in log.filters):
        log.addFilter(_DeadSocketFilter())


class Remote:
    """An open connection to one device: ``run`` a command, ``sftp`` for files."""

    def __init__(self, spec: HostSpec, conn, sftp):
        self.spec, self.conn, self.sftp = spec, conn, sftp

    @classmethod
    async def open(cls, spec: HostSpec) -> Remote:
        import asyncio

        import asyncssh

        _quiet_dead_socket_warnings()
        verdict: dict = {}
        path = spec.known_hosts_path
        if path.is_file():
            try:  # a damaged file is one line here, not a traceback from deep inside the handshake
                asyncssh.read_known_hosts(str(path))
            except (ValueError, UnicodeDecodeError, asyncssh.KeyImportError) as e:
                raise ShipError(f"known-hosts file {path} cannot be read ({e}); fix or remove the bad line") from None
        elif path.exists():
            raise ShipError(f"known-hosts file {path} is not a file")
        kw = {}
        if spec.identity:
            if not Path(spec.identity).is_file():
                raise ShipError(f"--identity {spec.identity}: no such key file")
            kw["client_keys"] = [spec.identity]
        try:
            conn, _ = await asyncio.wait_for(asyncssh.create_connection(
                _client_class(spec, verdict), spec.host, spec.port, username=spec.user,
                known_hosts=str(path) if path.is_file() else b"", config=None,
                connect_timeout=spec.connect_timeout, encryption_algs=CIPHERS, **kw), spec.connect_timeout + 5)
            sftp = await conn.start_sftp_client()
        except asyncssh.HostKeyNotVerifiable:
            if "changed" in verdict:
                raise ShipError(f"{spec.label}: the host key has CHANGED (now {verdict['changed']}); it does not match "
                                f"{path}. If the device was reinstalled, remove its old line from {path}; otherwise "
                                "someone may be intercepting the connection") from None
            raise ShipError(f"{spec.label}: unknown host key {verdict.get('unknown', '')} (not in {path}); check it "
                            "and add it (ssh-keyscan), or pass --accept-new-host-key to trust it on first use") from None
        except asyncssh.PermissionDenied:
            raise ShipError(f"{spec.label}: permission denied for user {spec.user} (the key "
                            f"{spec.identity or 'from ~/.ssh or the agent'} is not accepted)") from None
        except asyncssh.KeyImportError as e:
            raise ShipError(f"--identity {spec.identity}: not a usable private key ({e})") from None
        except (asyncssh.Error, OSError, asyncio.TimeoutError) as e:
            why = getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e) or type(e).__name__
            raise ShipError(f"{spec.label}: cannot connect ({why})") from None
        return cls(spec, conn, sftp)

    async def run(self, argv: list[str], input: str | None = None, timeout: float | None = None):
        """Run ``argv`` on the device (quoted word by word); returns asyncssh's completed process (never raises on a
        non-zero exit)."""
        return await self.conn.run(shell_line(argv), input=input, check=False, timeout=timeout)

    async def close(self) -> None:
        self.sftp.exit()
        self.conn.close()
        try:
            await self.conn.wait_closed()
        except Exception:  # noqa: BLE001 — a connection that died already is closed enough
            pass


def local_identity() -> str:
    """Who holds a lock: the shipping user, machine and process."""
    import socket

    return f"{getpass.getuser()}@{socket.gethostname()} (pid {os.getpid()})"


async def read_json(remote: Remote, path: str) -> dict | None:
    """A JSON object file on the device (ship's records), or None when it is absent or not a JSON object."""
    import asyncssh

    try:
        async with remote.sftp.open(path, "rb") as f:
            raw = await f.read()
    except asyncssh.SFTPNoSuchFile:
        return None
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


async def write_json(remote: Remote, path: str, obj: dict) -> None:
    """Write then rename, so a reader never sees half a record."""
    tmp = path + ".tmp"
    async with remote.sftp.open(tmp, "wb") as f:
        await f.write(json.dumps(obj, indent=2).encode())
    await remote.sftp.posix_rename(tmp, path)
