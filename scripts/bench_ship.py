"""Ship's upload throughput against scp, side by side in one run, over loopback to a throwaway sshd; and how much a
resume after a killed connection re-sends.

    .venv/bin/python scripts/bench_ship.py [--mb 200] [--repeats 3]

Prints per repeat: scp seconds, ship seconds (upload + sha256 on the device + activation), and the ratio of
throughputs; then the median ratio, and the share of bytes re-sent by the ship that resumes a kill at 50 %.
Needs OpenSSH's sshd and scp (Debian: openssh-server, openssh-client).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the same throwaway sshd the tests use

from sshd_server import start_server  # noqa: E402

from sparsekd_deploy.bundle import Bundle  # noqa: E402
from sparsekd_deploy.ship.ship import LocalBundle, ShipOptions, ship_to  # noqa: E402


def make_bundle(src: Path, dst: Path, mb: int) -> Path:
    shutil.copytree(src, dst)
    b = Bundle.open(dst)
    have = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    pad = dst.parent / "pad.bin"
    with open(pad, "wb") as f:  # random: nothing on the path can compress it
        for _ in range(max(1, (mb << 20) - have) // (1 << 20)):
            f.write(os.urandom(1 << 20))
    b.add_files({"references/pad.bin": pad}, {})
    return dst


def scp_seconds(srv, bundle: Path, dest: Path, cipher: str | None = None) -> float:
    """scp with its default cipher (ChaCha20-Poly1305), or with ``cipher`` (ship's own first choice, AES-GCM)."""
    shutil.rmtree(dest, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(["scp", "-q", "-r", *(["-c", cipher] if cipher else []), "-P", str(srv.port), "-i",
                    str(srv.user_key), "-o", "BatchMode=yes",
                    "-o", f"UserKnownHostsFile={srv.known_hosts}", str(bundle), f"{srv.user}@127.0.0.1:{dest}"],
                   check=True)
    return time.perf_counter() - t0


def ship_seconds(srv, local: LocalBundle, dest: Path) -> tuple[float, dict]:
    """Whole ship wall time, and its phases (upload_and_verify = the upload + the device's hash of every byte)."""
    shutil.rmtree(dest, ignore_errors=True)
    t0 = time.perf_counter()
    res = asyncio.run(ship_to(local, srv.spec(), ShipOptions(path=str(dest))))
    assert res.verdict == "activated", res.to_dict()
    return time.perf_counter() - t0, res.timings


def resume_share(srv, local: LocalBundle, dest: Path) -> tuple[float, float]:
    """(share of the bundle delivered before the kill, share re-sent by the resuming ship)."""
    shutil.rmtree(dest, ignore_errors=True)
    total = sum(f.bytes for f in local.files)
    seen = {"n": 0, "killed": False}

    def progress(n):
        seen["n"] += n
        if seen["n"] >= total // 2 and not seen["killed"]:
            seen["killed"] = bool(srv.kill_sessions())

    first = asyncio.run(ship_to(local, srv.spec(), ShipOptions(path=str(dest)), progress))
    assert first.verdict == "error" and seen["killed"], first.to_dict()
    second = asyncio.run(ship_to(local, srv.spec(), ShipOptions(path=str(dest))))
    assert second.verdict == "activated", second.to_dict()
    return seen["n"] / total, second.bytes_sent / total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default=str(ROOT / "dist" / "demo"), help="a bundle to pad (make demo builds it)")
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = make_bundle(Path(args.bundle), tmp / "bundle", args.mb)
        size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
        local = LocalBundle.open(bundle)
        srv = start_server(tmp / "sshd")
        try:
            print(f"bundle {size / 1e6:.0f} MB, {len(local.files)} files, loopback sshd on port {srv.port}")
            print("| repeat | scp s (default cipher) | scp s (-c aes128-gcm) | ship s | of which upload + device hash s "
                  "| ship/scp default | ship/scp same cipher |")
            print("|---|---|---|---|---|---|---|")
            ratios, ratios_same = [], []
            for i in range(args.repeats):  # alternated, so drift in the machine's load hits all three
                s = scp_seconds(srv, bundle, tmp / "scp-dest")
                g = scp_seconds(srv, bundle, tmp / "scp-dest", "aes128-gcm@openssh.com")
                k, phases = ship_seconds(srv, local, tmp / "ship-dest")
                ratios.append(s / k)
                ratios_same.append(g / k)
                print(f"| {i + 1} | {s:.2f} | {g:.2f} | {k:.2f} | {phases['upload_and_verify']:.2f} | {s / k:.2f} | "
                      f"{g / k:.2f} |")
            print(f"bundle {size / 1e6:.0f} MB; median ship/scp throughput: {statistics.median(ratios):.2f} against "
                  f"scp's default cipher, {statistics.median(ratios_same):.2f} against scp with ship's cipher "
                  "(bar ≥ 0.50; ship's time includes the device hashing every byte and the activation)")
            before, resent = resume_share(srv, local, tmp / "resume-dest")
            print(f"resume: killed after {before:.0%} delivered; the next ship re-sent {resent:.0%} of the bytes "
                  "(bar ≤ 60 %)")
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
