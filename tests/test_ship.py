"""`ship`, `releases`, `rollback` against a real OpenSSH server on 127.0.0.1 (no mock of the transport).

Each fault must leave the previous release active and nothing lost. The "device" is this machine and its
sparsekd-deploy is this venv's.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from sshd_server import SSHD, start_server

from sparsekd_deploy.cli import main

pytestmark = pytest.mark.skipif(SSHD is None, reason="OpenSSH server (Debian package openssh-server) is not "
                                "installed; .ci/run installs it")
REMOTE_BIN = str(Path(sys.executable).with_name("sparsekd-deploy"))


def run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("sshd"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def bundles(ort_bundle, tmp_path_factory):
    """A good ORT bundle, a second version of it (another release), and a damaged one whose checksums are valid
    (its weights were overwritten and the manifest re-recorded) so only validation can catch it."""
    import onnx
    from onnx import numpy_helper

    from sparsekd_deploy.bundle import Bundle, file_table

    root = tmp_path_factory.mktemp("ship-bundles")
    shutil.copytree(ort_bundle, root / "good")

    def variant(name: str) -> Path:
        d = root / name
        shutil.copytree(root / "good", d)
        m = json.loads((d / "manifest.json").read_text())
        m["name"] = name  # manifest.json is not in its own file table: a new version, still a valid bundle
        (d / "manifest.json").write_text(json.dumps(m))
        return d

    second, third, bad = variant("second"), variant("third"), variant("damaged")
    model = onnx.load(str(bad / "model.onnx"))
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype.kind == "f" and w.ndim == 2:
            init.CopyFrom(numpy_helper.from_array((-40.0 * w[::-1]).astype(w.dtype), init.name))
    onnx.save(model, str(bad / "model.onnx"))
    m = json.loads((bad / "manifest.json").read_text())
    m["files"] = file_table(bad)
    (bad / "manifest.json").write_text(json.dumps(m))
    Bundle.open(bad)  # checksums valid
    return {"good": root / "good", "second": second, "third": third, "damaged": bad}


def ship(server, bundle, path, *extra):
    r = run(["ship", str(bundle), *server.host_args(), "--path", str(path), "--remote-bin", REMOTE_BIN, "--json",
             *extra])
    return r, (json.loads(r.stdout) if r.stdout.strip().startswith("{") else None)


def current(path: Path) -> str | None:
    link = path / "current"
    return os.readlink(link) if link.is_symlink() else None


def test_ship_validate_activate_and_reship_is_recognised(server, bundles, tmp_path):
    dest = tmp_path / "odd name;$x `touch pwned`"
    r, out = ship(server, bundles["good"], dest, "--validate")
    assert r.exit_code == 0, r.output
    dev = out["devices"][0]
    assert dev["verdict"] == "activated" and [s["name"] for s in dev["steps"]] == ["device-tool", "validate"]
    assert current(dest) == f"releases/{out['version']}"
    assert not (Path.cwd() / "pwned").exists() and not (dest / "pwned").exists()
    from sparsekd_deploy.bundle import Bundle

    Bundle.open(dest / "current")  # whole: every checksum holds on the device
    assert json.loads((dest / "current" / "validation.json").read_text())["passed"] is True
    r, out = ship(server, bundles["good"], dest)
    assert r.exit_code == 0 and out["devices"][0]["verdict"] == "already-current"
    assert out["devices"][0]["bytes_sent"] == 0
    r = run(["releases", *server.host_args(), "--path", str(dest), "--json"])
    rel = json.loads(r.stdout)["releases"]
    assert [(x["version"], x["current"], x["status"], x["validation"]["passed"]) for x in rel] == [
        (out["version"], True, "ready", True)]


def test_killed_connection_resumes_and_previous_stays_active(server, bundles, tmp_path):
    from sparsekd_deploy.bundle import Bundle
    from sparsekd_deploy.ship.ship import LocalBundle, ShipOptions, ship_to

    dest = tmp_path / "dev"
    r, out = ship(server, bundles["good"], dest)
    first = out["version"]
    big = Bundle.open(bundles["second"])
    pad = tmp_path / "pad.bin"
    pad.write_bytes(os.urandom(24 << 20))
    big.add_files({"references/pad.bin": pad}, {})
    local = LocalBundle.open(bundles["second"])
    total = sum(f.bytes for f in local.files)
    seen = {"n": 0, "killed": 0}

    def progress(n):
        seen["n"] += n
        if seen["n"] >= total // 2 and not seen["killed"]:
            seen["killed"] = server.kill_sessions()

    res = asyncio.run(ship_to(local, server.spec(), ShipOptions(path=str(dest)), progress))
    assert seen["killed"] and res.verdict == "error" and "ship again to resume" in res.message, res.to_dict()
    assert current(dest) == f"releases/{first}"
    assert (dest / "releases" / f"{local.version}.partial").is_dir()
    res2 = asyncio.run(ship_to(local, server.spec(), ShipOptions(path=str(dest))))
    assert res2.verdict == "activated", res2.to_dict()
    assert res2.bytes_sent <= 0.6 * total  # only what the first attempt had not delivered
    assert any("previous ship here" in n for n in res2.notes)
    assert current(dest) == f"releases/{local.version}"
    Bundle.open(dest / "current")


def test_file_corrupted_on_device_is_refused(server, bundles, tmp_path):
    from sparsekd_deploy.ship.ship import LocalBundle, ShipOptions, ship_to

    dest = tmp_path / "dev"
    assert ship(server, bundles["good"], dest)[0].exit_code == 0
    before = current(dest)
    local = LocalBundle.open(bundles["third"])

    async def corrupt():
        p = dest / "releases" / f"{local.version}.partial" / "model.onnx"
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))

    res = asyncio.run(ship_to(local, server.spec(), ShipOptions(path=str(dest)), after_upload=corrupt))
    assert res.verdict == "error" and "checksum mismatch" in res.message and "model.onnx" in res.message
    assert current(dest) == before and not (dest / "releases" / local.version).exists()
    # A release already on the device that rots is refused too, and rollback re-checks before switching.
    assert ship(server, bundles["second"], dest)[0].exit_code == 0
    good_version = before.split("/")[1]
    model = dest / "releases" / good_version / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\0")
    r = run(["rollback", *server.host_args(), "--path", str(dest)])
    assert r.exit_code == 1 and "no longer matches its checksums" in r.output
    assert current(dest) != before


def test_failing_validation_marks_release_failed_and_keeps_current(server, bundles, tmp_path):
    dest = tmp_path / "dev"
    r, out = ship(server, bundles["good"], dest, "--validate")
    before = current(dest)
    r, out = ship(server, bundles["damaged"], dest, "--validate")
    dev = out["devices"][0]
    assert r.exit_code == 1 and dev["verdict"] == "failed", r.output
    assert current(dest) == before
    log = Path(dev["steps"][-1]["log"])
    assert log.parent == dest / "releases" and "kl_topk" in log.read_text()
    r = run(["releases", *server.host_args(), "--path", str(dest), "--json"])
    status = {x["version"]: (x["status"], x["validation"]["passed"]) for x in json.loads(r.stdout)["releases"]}
    assert status[out["version"]] == ("failed", False)
    # shipped again without the steps, a failed release does not go live unchecked
    r, out2 = ship(server, bundles["damaged"], dest)
    assert r.exit_code == 1 and out2["devices"][0]["verdict"] == "refused" and current(dest) == before


def _one_line(r):
    return [ln for ln in r.output.strip().splitlines() if ln.strip()]


def test_connection_faults_are_one_line_and_write_nothing(server, bundles, tmp_path):
    from sshd_server import free_port, keygen

    dest = tmp_path / "never"
    args = ["ship", str(bundles["good"]), "--path", str(dest)]
    host = f"{server.user}@127.0.0.1"
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    other = keygen(tmp_path / "other_host")
    wrong_hosts = tmp_path / "known_hosts_wrong"
    wrong_hosts.write_text(f"[127.0.0.1]:{server.port} " + " ".join(Path(f"{other}.pub").read_text().split()[:2]))
    wrong_user = keygen(tmp_path / "not_authorized")
    cases = {
        "unknown host key": [*args, "--host", host, "--port", str(server.port), "--identity", str(server.user_key),
                             "--known-hosts", str(empty)],
        "CHANGED": [*args, "--host", host, "--port", str(server.port), "--identity", str(server.user_key),
                    "--known-hosts", str(wrong_hosts)],
        "permission denied": [*args, "--host", host, "--port", str(server.port), "--identity", str(wrong_user),
                              "--known-hosts", str(server.known_hosts)],
        "cannot connect": [*args, "--host", host, "--port", str(free_port()), "--identity", str(server.user_key),
                           "--known-hosts", str(server.known_hosts)],
    }
    for needle, argv in cases.items():
        r = run(argv)
        assert r.exit_code == 2, (needle, r.output)
        lines = _one_line(r)
        assert len(lines) == 1 and needle in lines[0], (needle, r.output)
        assert not dest.exists()
    assert empty.read_text() == ""  # nothing trusted without --accept-new-host-key


def test_accept_new_host_key_records_it_and_a_changed_key_is_still_refused(server, bundles, tmp_path):
    known = tmp_path / "kh"
    base = ["ship", str(bundles["good"]), "--path", str(tmp_path / "dev"), "--host", f"{server.user}@127.0.0.1",
            "--port", str(server.port), "--identity", str(server.user_key), "--known-hosts", str(known)]
    r = run([*base, "--accept-new-host-key"])
    assert r.exit_code == 0, r.output
    assert known.read_text().split()[:3] == [f"[127.0.0.1]:{server.port}",
                                             *Path(f"{server.host_key}.pub").read_text().split()[:2]]
    assert run(base).exit_code == 0  # now known, no flag needed


def test_concurrent_ship_is_refused_naming_the_holder(server, bundles, tmp_path):
    from sparsekd_deploy.ship.lock import DeviceLock
    from sparsekd_deploy.ship.remote import Remote
    from sparsekd_deploy.ship.ship import open_layout

    dest = tmp_path / "dev"
    held, release = threading.Event(), threading.Event()

    async def hold():
        remote = await Remote.open(server.spec())
        layout = await open_layout(remote, str(dest))
        async with DeviceLock(remote, layout):
            held.set()
            await asyncio.get_running_loop().run_in_executor(None, release.wait)
        await remote.close()

    t = threading.Thread(target=asyncio.run, args=(hold(),))
    t.start()
    try:
        assert held.wait(30)
        r, out = ship(server, bundles["good"], dest)
        msg = out["devices"][0]["message"]
        assert r.exit_code == 2 and "is being shipped to by" in msg and f"pid {os.getpid()}" in msg
        assert not any(p.name.startswith("v-") for p in (dest / "releases").iterdir())
    finally:
        release.set()
        t.join(30)
    assert ship(server, bundles["good"], dest)[0].exit_code == 0  # released with the holder's connection


def test_retention_and_rollback(server, bundles, tmp_path):
    dest = tmp_path / "dev"
    versions = []
    for name in ("good", "second", "third"):
        r, out = ship(server, bundles[name], dest, "--keep", "1")
        assert r.exit_code == 0, r.output
        versions.append(out["version"])
    on_device = sorted(p.name for p in (dest / "releases").iterdir() if p.is_dir())
    assert on_device == sorted(versions[1:])  # keep 1, but never current nor the previous one
    r = run(["rollback", *server.host_args(), "--path", str(dest), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout) == {"host": server.spec().label, "path": str(dest),
                                                         "from": versions[2], "to": versions[1]}
    assert current(dest) == f"releases/{versions[1]}"
    r = run(["rollback", *server.host_args(), "--path", str(dest), "--to", versions[0]])
    assert r.exit_code == 2 and f"no release {versions[0]}" in r.output
    r = run(["rollback", *server.host_args(), "--path", str(dest), "--to", "; rm -rf /"])
    assert r.exit_code == 2 and "is not a release version" in r.output


def test_missing_device_tool_says_how_to_install_and_sends_nothing(server, bundles, tmp_path):
    dest = tmp_path / "dev"
    r = run(["ship", str(bundles["good"]), *server.host_args(), "--path", str(dest), "--validate",
             "--remote-bin", "/nonexistent/sparsekd-deploy"])
    assert r.exit_code == 2 and "pip install 'sparsekd-deploy[device]==0.1.0'" in r.output
    assert not any(p.name.startswith("v-") for p in (dest / "releases").iterdir())


def test_fleet_canary_failure_leaves_the_others_untouched(server, bundles, tmp_path):
    paths = [tmp_path / f"device{i}" for i in range(3)]
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("defaults:\n"
                     f"  user: {server.user}\n  port: {server.port}\n  identity: {server.user_key}\n"
                     "hosts:\n" + "".join(f"  - host: 127.0.0.1\n    path: {p}\n" for p in paths))
    common = ["--known-hosts", str(server.known_hosts), "--remote-bin", REMOTE_BIN, "--validate", "--json"]
    r = run(["ship", str(bundles["damaged"]), "--fleet", str(fleet), "--canary", "1", *common])
    verdicts = [d["verdict"] for d in json.loads(r.stdout)["devices"]]
    assert r.exit_code == 1 and verdicts == ["failed", "skipped", "skipped"], r.output
    assert not paths[1].exists() and not paths[2].exists()
    r = run(["ship", str(bundles["good"]), "--fleet", str(fleet), "--parallel", "2", *common])
    assert r.exit_code == 0, r.output
    assert [d["verdict"] for d in json.loads(r.stdout)["devices"]] == ["activated"] * 3


FAKE_TRTEXEC = '''#!{python}
"""trtexec's stand-in: the banner, and with --saveEngine a plan with a real header layout + the layer info."""
import json, sys
sys.path.insert(0, {tests!r})
from test_engine_add import LAYERS, TRTEXEC_LOG, plan_bytes
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
if "saveEngine" not in args:
    print("&&&& RUNNING TensorRT.trtexec [TensorRT v101601] [b11] # trtexec")
    sys.exit(1)
open(args["saveEngine"], "wb").write(plan_bytes(10, 16, 1))
open(args["exportLayerInfo"], "w").write(json.dumps(LAYERS))
print(TRTEXEC_LOG)
'''


def test_build_engine_falls_back_to_trtexec_and_engine_add(server, device_step_bundle, tmp_path):
    """A device whose Python has no TensorRT but which has trtexec (JetPack): the recorded trtexec line runs in the
    release, then `engine add` records the engine there — and the release goes live with it."""
    fake = tmp_path / "trtexec"
    fake.write_text(FAKE_TRTEXEC.format(python=sys.executable, tests=str(Path(__file__).parent)))
    fake.chmod(0o755)
    dest = tmp_path / "dev"
    r, out = ship(server, device_step_bundle[0], dest, "--build-engine", "--remote-trtexec", str(fake))
    assert r.exit_code == 0, r.output
    step = out["devices"][0]["steps"][-1]
    assert step["name"] == "engine-build" and step["summary"] == "built by trtexec (TensorRT 10) + engine add"
    from sparsekd_deploy.bundle import Bundle

    live = Bundle.open(dest / "current")
    assert live.manifest["engine"]["tensorrt_version"].startswith("10.16") and live.has("engine.plan")
    assert "engine build" in Path(step["log"]).read_text()  # the Python builder's failure is in the log first


def test_live_release_is_never_relabelled_nor_rebuilt(server, bundles, tmp_path):
    dest = tmp_path / "dev"
    assert ship(server, bundles["good"], dest)[0].exit_code == 0
    assert ship(server, bundles["second"], dest)[0].exit_code == 0
    live = current(dest)
    failing = tmp_path / "bin-failing-validate"
    failing.write_text(f'#!/bin/sh\nif [ "$1" = validate ]; then echo "gate failed" >&2; exit 1; fi\n'
                       f'exec {REMOTE_BIN} "$@"\n')
    failing.chmod(0o755)
    r = run(["ship", str(bundles["second"]), *server.host_args(), "--path", str(dest), "--validate",
             "--remote-bin", str(failing), "--json"])
    dev = json.loads(r.stdout)["devices"][0]
    assert r.exit_code == 1 and "LIVE release" in dev["message"] and "stays current" in dev["message"]
    assert current(dest) == live
    rel = {x["version"]: x for x in json.loads(run(["releases", *server.host_args(), "--path", str(dest),
                                                     "--json"]).stdout)["releases"]}
    assert rel[live.split("/")[1]]["status"] == "ready" and rel[live.split("/")[1]]["current"]
    r, out = ship(server, bundles["second"], dest, "--build-engine")
    assert r.exit_code == 1 and "is live; its engine is not rebuilt in place" in out["devices"][0]["message"]
    # retention still protects the previous release by its activation history
    assert ship(server, bundles["third"], dest, "--keep", "1")[0].exit_code == 0
    assert (dest / live).is_dir()


def test_device_state_problems_are_found_before_anything_is_sent(server, bundles, tmp_path):
    dest = tmp_path / "dev"
    (dest / "current").mkdir(parents=True)
    r, out = ship(server, bundles["good"], dest)
    assert r.exit_code == 2 and "is a directory, not the symlink ship switches" in out["devices"][0]["message"]
    assert not any((dest / "releases").iterdir())
    never = tmp_path / "never-shipped"
    for cmd in (["releases"], ["rollback"]):
        r = run([*cmd, *server.host_args(), "--path", str(never)])
        assert r.exit_code == 2 and "nothing was ever shipped there" in r.output and not never.exists()
    garbage = tmp_path / "kh"
    garbage.write_bytes(b"\xff\xfe@revoked\n|1|abc|def ssh-ed25519\n")
    r = run(["ship", str(bundles["good"]), "--host", f"{server.user}@127.0.0.1", "--port", str(server.port),
             "--identity", str(server.user_key), "--known-hosts", str(garbage), "--path", str(never)])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "cannot be read" in lines[0] and not never.exists()
