"""Loaded by every rank of a launched CLI run in test_distributed.py (this directory is put first on PYTHONPATH): the
main process's last writes are made slow (EXIT_HOOKS_MAIN_SLOW seconds after ``distill`` returns: as the outputs of a
large student take time to write), and each rank records when its work ended and when its interpreter exited
(EXIT_HOOKS_LOG/rank<R>.json), so the test can tell whether a rank left while the main process still wrote."""

import atexit
import json
import os
import sys
import time
from pathlib import Path

_log = os.environ.get("EXIT_HOOKS_LOG")
_rank = os.environ.get("RANK")
if _log and _rank is not None:
    _times: dict[str, float] = {}

    def _record() -> None:  # registered first, so it runs last: after the process group was left
        _times["exited"] = time.time()
        Path(_log, f"rank{_rank}.json").write_text(json.dumps(_times))

    atexit.register(_record)

    def _slow_main_writes() -> None:
        import sparsekd_deploy.core.distill as distill_module

        run = distill_module.distill

        def distill(*args, **kwargs):
            result = run(*args, **kwargs)
            if _rank == "0":
                time.sleep(float(os.environ.get("EXIT_HOOKS_MAIN_SLOW", "0")))
            _times["work_done"] = time.time()
            return result

        distill_module.distill = distill

    import builtins

    _import = builtins.__import__

    def _patching_import(name, *args, **kwargs):  # patch once the distiller module is fully loaded
        module = _import(name, *args, **kwargs)
        loaded = sys.modules.get("sparsekd_deploy.core.distill")
        if loaded is not None and hasattr(loaded, "StagedDistiller") and builtins.__import__ is _patching_import:
            builtins.__import__ = _import
            _slow_main_writes()
        return module

    builtins.__import__ = _patching_import
