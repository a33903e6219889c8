"""A real OpenSSH server on 127.0.0.1 for the ship tests: throwaway host and user keys in a temp dir.

The "device" is this machine; its sparsekd-deploy is this venv's. `.ci/run` installs Debian's openssh-server;
without it the tests skip, saying so.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@dataclass
class SSHServer:
    root: Path
    port: int
    user: str
    user_key: Path
    host_key: Path
    known_hosts: Path  # a known_hosts file that trusts this server
    proc: subprocess.Popen | None = None

    def start(self) -> SSHServer:
        cfg = self.root / "sshd_config"
        cfg.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
            f"PidFile {self.root / 'sshd.pid'}", f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
            "StrictModes no", "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "PubkeyAuthentication yes", "PermitRootLogin prohibit-password", "MaxSessions 50", "MaxStartups 50",
            "Subsystem sftp internal-sftp", "LogLevel ERROR", "",
        ]))
        try:
            Path("/run/sshd").mkdir(exist_ok=True)  # the privilege-separation dir sshd insists on (as root)
        except PermissionError:
            pass  # not root: sshd runs without privilege separation's chroot and does not need it
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stderr=open(self.root / "sshd.log", "w"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.root / 'sshd.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sshd did not start listening")

    def sessions(self) -> list[int]:
        """The per-connection sshd processes (children of the listener), read from /proc (no procps needed)."""
        kids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # the process ended while we looked
            if int(fields[1]) == self.proc.pid:  # fields[1] is the parent pid
                kids.append(int(stat.parent.name))
        return kids

    def kill_sessions(self) -> int:
        pids = self.sessions()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def host_args(self) -> list[str]:
        return ["--host", f"{self.user}@127.0.0.1", "--port", str(self.port), "--identity", str(self.user_key),
                "--known-hosts", str(self.known_hosts)]

    def spec(self, **kw):
        from sparsekd_deploy.ship.remote import HostSpec

        kw = {"identity": str(self.user_key), "known_hosts": str(self.known_hosts), **kw}
        return HostSpec.parse(f"{self.user}@127.0.0.1", port=self.port, **kw)


def start_server(root: Path) -> SSHServer:
    import getpass

    root.mkdir(parents=True, exist_ok=True)
    host_key = keygen(root / "host_ed25519")
    user_key = keygen(root / "user_ed25519")
    (root / "authorized_keys").write_text((root / "user_ed25519.pub").read_text())
    port = free_port()
    pub = (root / "host_ed25519.pub").read_text().split()
    known = root / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
    return SSHServer(root, port, getpass.getuser(), user_key, host_key, known).start()
