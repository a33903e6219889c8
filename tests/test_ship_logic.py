"""ship's decisions that need no SSH server: quoting, path and version checks, fleet files, retention, gates."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from sparsekd_deploy.ship.fleet import load_fleet
from sparsekd_deploy.ship.layout import check_remote_path, check_version
from sparsekd_deploy.ship.releases import Release, previous_of, rollback_target, to_remove
from sparsekd_deploy.ship.remote import HostSpec, ShipError, shell_line
from sparsekd_deploy.ship.steps import gate_flags, needed_version


def test_shell_line_keeps_every_argument_one_literal_word(tmp_path):
    hostile = ["odd name;$x", "`touch pwned`", "$(id)", "a'b\"c", "*", "--", "-rf"]
    line = shell_line(["printf", "%s\\n", *hostile])
    out = subprocess.run(["sh", "-c", line], capture_output=True, text=True, cwd=tmp_path).stdout
    assert out.splitlines() == hostile and not (tmp_path / "pwned").exists()
    assert shlex.split(line)[2:] == hostile


@pytest.mark.parametrize("bad", ["", "   ", "a\nb", "x\x00y", "-rf"])
def test_remote_paths_refused(bad):
    with pytest.raises(ShipError):
        check_remote_path(bad)


def test_remote_path_keeps_spaces_and_metacharacters():
    assert check_remote_path("/opt/odd name;$x/") == "/opt/odd name;$x"


@pytest.mark.parametrize("bad", ["v-123", "../v-0123456789ab", "v-0123456789AB", "; rm -rf /"])
def test_versions_are_checked(bad):
    with pytest.raises(ShipError, match="not a release version"):
        check_version(bad)


def test_host_spec_parsing():
    s = HostSpec.parse("nvidia@orin-07", port=2222)
    assert (s.user, s.host, s.port, s.label) == ("nvidia", "orin-07", 2222, "nvidia@orin-07:2222")
    for bad, port in [("", None), ("-oProxyCommand=x", None), ("a b", None), ("host", 70000)]:
        with pytest.raises(ShipError):
            HostSpec.parse(bad, port=port)


def _rel(v, shipped, status="ready", activated=(), current=False):
    return Release(v, {"status": status, "shipped_at": shipped, "activated_at": list(activated)}, current)


def test_retention_never_removes_current_or_previous():
    rs = [_rel("v-000000000001", "1", activated=["1"]), _rel("v-000000000002", "2", activated=["2"]),
          _rel("v-000000000003", "3", status="failed"), _rel("v-000000000004", "4", activated=["4"], current=True)]
    assert previous_of(rs).version == "v-000000000002"
    assert [r.version for r in to_remove(rs, keep=1)] == ["v-000000000001", "v-000000000003"]
    assert [r.version for r in to_remove(rs, keep=3)] == ["v-000000000001"]
    # the previous one stays even when it is the oldest
    rs[0].record["activated_at"] = ["5"]
    assert previous_of(rs).version == "v-000000000001"
    assert [r.version for r in to_remove(rs, keep=1)] == ["v-000000000002", "v-000000000003"]


def test_rollback_target_rules():
    rs = [_rel("v-000000000001", "1", activated=["1"]), _rel("v-000000000002", "2", status="failed"),
          _rel("v-000000000003", "3", activated=["3"], current=True)]
    assert rollback_target(rs, None).version == "v-000000000001"
    with pytest.raises(ShipError, match="failed its steps"):
        rollback_target(rs, "v-000000000002")
    with pytest.raises(ShipError, match="no release v-00000000000f"):
        rollback_target(rs, "v-00000000000f")
    with pytest.raises(ShipError, match="nothing to roll back to"):
        rollback_target([rs[2]], None)


def test_gate_flags_from_manifest():
    m = {"gates": {"max_kl": 0.25, "min_top1": 0.7, "evil; rm": 1, "max_x": "1; rm -rf /", "min_ok": True}}
    assert gate_flags(m) == ["--max-kl", "0.25", "--min-top1", "0.7"]
    assert gate_flags({"gates": {"max_kl": 0.25, "require_determinism": False}}) == ["--max-kl", "0.25",
                                                                                    "--no-determinism-gate"]
    assert gate_flags({"gates": {"require_determinism": True}}) == []
    assert gate_flags({"gates": {"require_determinism": "no"}}) == []  # only the recorded False drops the gate
    assert needed_version({"tool": "sparsekd-deploy 0.3.1"}) == (0, 3, 1)


def test_fleet_file_problems_reported_together(tmp_path):
    f = tmp_path / "fleet.yaml"
    f.write_text("defaults: {user: nvidia, colour: red}\nhosts:\n  - host: a\n  - {port: 22}\n  - host: b\n"
                 "    port: 99999\n")
    with pytest.raises(ShipError) as e:
        load_fleet(f)
    msg = str(e.value)
    assert "unknown key 'colour'" in msg and "hosts[2]: needs `host:`" in msg and "hosts[3]" in msg
    f.write_text("hosts:\n  - nvidia@a\n  - host: b\n    user: ubuntu\n    path: /opt/m\n")
    devices = load_fleet(f)
    assert [(d.spec.user, d.spec.host, d.path) for d in devices][1] == ("ubuntu", "b", "/opt/m")
    assert devices[0].spec.user == "nvidia"
    f.write_text("hosts: [\n")
    with pytest.raises(ShipError, match="not valid YAML"):
        load_fleet(f)


def test_home_relative_paths_and_ports():
    assert check_remote_path("~/models/x") == "models/x" and check_remote_path("~") == "."
    with pytest.raises(ShipError, match="only ~/"):
        check_remote_path("~bob/x")
    for port in (0, True, 22.5, "22", 70000):
        with pytest.raises(ShipError, match="not a TCP port"):
            HostSpec.parse("h", port=port)


def test_rollback_only_to_a_release_whose_steps_passed():
    rs = [_rel("v-000000000001", "1", status="verified", activated=["1"]),
          _rel("v-000000000002", "2", activated=["2"], current=True)]
    with pytest.raises(ShipError, match="never completed its steps"):
        rollback_target(rs, None)


def test_fleet_refuses_duplicates_directories_and_non_text(tmp_path):
    f = tmp_path / "fleet.yaml"
    f.write_text("hosts:\n  - {host: a, path: /m}\n  - {host: a, path: /m}\n  - {host: b, known_hosts: [1]}\n")
    with pytest.raises(ShipError) as e:
        load_fleet(f)
    assert "listed twice" in str(e.value) and "known_hosts must be text" in str(e.value)
    with pytest.raises(ShipError, match="a directory"):
        load_fleet(tmp_path)


def test_fleet_exit_code_says_whether_anything_changed():
    from sparsekd_deploy.ship.fleet import fleet_exit_code
    from sparsekd_deploy.ship.ship import ShipResult

    def r(verdict):
        return ShipResult("h", "/p", "v-000000000001", verdict)

    assert fleet_exit_code([r("activated"), r("already-current")]) == 0
    assert fleet_exit_code([r("error"), r("skipped")]) == 2  # nothing changed anywhere
    assert fleet_exit_code([r("activated"), r("error")]) == 1  # some devices changed
    assert fleet_exit_code([r("failed"), r("skipped")]) == 1


def test_activation_stamps_order_ships_within_one_second():
    import re

    from sparsekd_deploy.ship.releases import now

    # with seconds, two ships finishing in one second tied, and "the previous release" was picked arbitrarily
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", now())
