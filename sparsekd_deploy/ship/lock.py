"""One ship at a time per device path: a kernel ``flock`` held on the device for as long as this connection lives.

Why flock over a lock *file*: a lock file outlives a ship that died (a killed laptop, a dropped link) and then needs
heartbeats and guesswork to tell stale from live. The flock is held by a ``flock … cat`` process whose stdin is this
SSH channel; when the connection ends for any reason, ``cat`` reads end-of-file and the kernel drops the lock. So a
lock can never be stale; what can be stale is the *holder record* (``.ship.lock.json``), and finding one when the lock
is free means the previous ship ended without finishing — that is reported, and its upload resumes.
"""

from __future__ import annotations

import asyncio
import datetime as _dt

from .layout import Layout
from .remote import Remote, ShipError, local_identity, read_json, shell_line, write_json

_BUSY = 75  # flock -E: the exit status when the lock is held by someone else


class DeviceLock:
    def __init__(self, remote: Remote, layout: Layout):
        self.remote, self.layout = remote, layout
        self.proc = None
        self.previous_holder: dict | None = None  # a record left by a ship that ended without finishing

    async def __aenter__(self) -> DeviceLock:
        # The script is a fixed literal; only the lock path (quoted) comes from the user.
        cmd = shell_line(["flock", "-n", "-E", str(_BUSY), self.layout.lock, "sh", "-c", "echo locked; exec cat"])
        self.proc = await self.remote.conn.create_process(cmd)
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        if line.strip() != "locked":
            await self.proc.wait()
            status = self.proc.exit_status
            if status == _BUSY:
                holder = await read_json(self.remote, self.layout.lock_info) or {}
                raise ShipError(f"{self.remote.spec.label}:{self.layout.root} is being shipped to by "
                                f"{holder.get('holder', 'another ship')} since {holder.get('since', '?')}; "
                                "wait for it to finish (the lock is released when that ship's connection ends)")
            if status == 127:
                raise ShipError(f"{self.remote.spec.label}: the device has no `flock` (util-linux); install it there")
            err = (await self.proc.stderr.read()).strip()
            raise ShipError(f"{self.remote.spec.label}: cannot lock {self.layout.lock}: {err or f'exit {status}'}")
        self.previous_holder = await read_json(self.remote, self.layout.lock_info)
        await write_json(self.remote, self.layout.lock_info, {
            "holder": local_identity(),
            "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        })
        return self

    async def __aexit__(self, *exc) -> None:
        import asyncssh

        try:
            await self.remote.sftp.remove(self.layout.lock_info)
            self.proc.stdin.write_eof()
            await asyncio.wait_for(self.proc.wait(), 10)
        except (asyncssh.Error, OSError, asyncio.TimeoutError):
            # The connection is gone: the device already released the flock; the holder record stays behind and
            # the next ship reports it.
            pass
