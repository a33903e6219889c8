"""One run per output directory: the lock names its holder, reports a dead holder as stale, and goes on exit."""

import json
import os
import socket
import subprocess
import sys

import pytest

from sparsekd_deploy.errors import SparseKDError
from sparsekd_deploy.locks import LockError, dir_lock, lock_path


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_records_the_holder_and_is_removed_on_exit(tmp_path):
    out = tmp_path / "sub" / "run"
    with dir_lock(out) as lock:
        assert lock == tmp_path / "sub" / "run.lock"
        held = json.loads(lock.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["started"]
    assert not lock.exists()


def test_lock_is_removed_when_the_run_fails(tmp_path):
    with pytest.raises(RuntimeError), dir_lock(tmp_path / "run"):
        raise RuntimeError("boom")
    assert not lock_path(tmp_path / "run").exists()


def test_second_holder_is_told_who_holds_it(tmp_path):
    out = tmp_path / "run"
    with dir_lock(out) as lock:
        started = json.loads(lock.read_text())["started"]
        with pytest.raises(LockError) as e, dir_lock(out):
            pass
        assert f"in use by pid {os.getpid()} since {started}" in str(e.value)
        assert isinstance(e.value, SparseKDError) and e.value.exit_code == 2
        assert lock.exists()  # the refused second run did not remove the holder's lock
    assert not lock.exists()


def test_lock_held_by_another_live_process(tmp_path):
    out = tmp_path / "run"
    code = ("import sys, time; from sparsekd_deploy.locks import dir_lock\n"
            "with dir_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=f"in use by pid {holder.pid} since "), dir_lock(out):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_dead_pid_is_reported_stale_not_taken(tmp_path):
    out = tmp_path / "run"
    pid = dead_pid()
    lock = lock_path(out)
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2026-01-02T03:04:05+00:00"}))
    with pytest.raises(LockError) as e, dir_lock(out):
        pytest.fail("a stale lock must not be taken silently")
    assert str(e.value).endswith(f"stale lock from pid {pid} (dead) since 2026-01-02T03:04:05+00:00; "
                                 f"remove {lock} if no other run uses it")
    assert json.loads(lock.read_text())["pid"] == pid  # left for the user to remove
    lock.unlink()
    with dir_lock(out):
        pass


def test_lock_from_another_host_is_not_judged_from_here(tmp_path):
    out = tmp_path / "run"
    lock_path(out).write_text(json.dumps({"pid": dead_pid(), "host": "orin-07", "started": "2026-01-02T03:04:05"}))
    with pytest.raises(LockError, match="on host orin-07 since 2026-01-02T03:04:05 \\(cannot check"), dir_lock(out):
        pass


def test_unreadable_lock_says_so(tmp_path):
    out = tmp_path / "run"
    lock_path(out).write_text("")
    with pytest.raises(LockError, match="does not say who holds it"), dir_lock(out):
        pass
