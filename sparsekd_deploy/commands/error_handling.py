"""How every command answers a failure: one line on stderr and an exit code, never a traceback for a user's mistake.

This lives in the commands layer (not in ``cli.py``) so that a command module can be imported on its own, and the
library below never depends on the CLI.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import sys

from ..console import json_stdout, print_error

# File-system failures the user can act on (a full disk, a read-only mount, a missing permission, a path that is a
# file where a directory belongs). Anything else that escapes as OSError is a bug and keeps its traceback.
_USER_OSERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                  errno.ENAMETOOLONG, errno.EEXIST}


def os_error_line(e: OSError) -> str:
    where = f" {e.filename}" if e.filename else ""
    return f"could not write or read{where}: {e.strerror or e}"


def handle_errors(fn=None, *, resumable: bool = False, interrupt_hint: str = ""):
    """Wrap a click command: ``SparseKDError`` → its message and exit code; a package missing from a lean install
    (torch & co.) → one line naming the extra, exit 2; a user-fixable ``OSError`` → one line and exit 2; Ctrl-C →
    exit 130, with the resume hint only on commands that can resume (``resumable``)."""

    def decorate(f):
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            from ..errors import MissingDependencyError, SparseKDError

            try:
                # --json: stdout carries the one JSON document and nothing else (library prints go to stderr).
                with json_stdout() if kwargs.get("as_json") else contextlib.nullcontext():
                    return f(*args, **kwargs)
            except SparseKDError as e:
                print_error(str(e))
                sys.exit(e.exit_code)
            except ModuleNotFoundError as e:
                # A lean (device-side) install lacks torch & co.: the commands import them lazily, so the failure
                # surfaces here, once for every command, as one line naming the extra to install.
                missing = MissingDependencyError.from_import_error(e)
                if missing is None:
                    raise
                print_error(str(missing))
                sys.exit(missing.exit_code)
            except OSError as e:
                if e.errno not in _USER_OSERRORS:
                    raise
                # Writers assemble their output in `<out>.partial` and remove it on failure, so nothing stays
                # half-written; the message says so because that is what a user with a full disk worries about.
                print_error(f"{os_error_line(e)}; nothing was left half-written (outputs are renamed into place "
                            "only when complete)")
                sys.exit(2)
            except KeyboardInterrupt:
                hint = "; accepted stages are checkpointed: rerun with --resume to continue" if resumable else ""
                hint = f"; {interrupt_hint}" if interrupt_hint else hint
                print_error(f"interrupted{hint}")
                sys.exit(130)

        return wrapper

    return decorate(fn) if fn is not None else decorate
