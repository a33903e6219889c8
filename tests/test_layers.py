"""The package's layers import one way (models → core → exporters → bundle → targets → validate → pipeline →
commands → cli), checked by import-linter's contract in pyproject.toml; every module imports on its own."""

import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sparsekd_deploy

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is a dev dependency (pip install -e '.[dev]')"
    r = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in r.stdout


MODULES = sorted(m.name for m in pkgutil.walk_packages(sparsekd_deploy.__path__, "sparsekd_deploy."))


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith(("sparsekd_deploy.commands.",
                                                                         "sparsekd_deploy.pipeline"))])
def test_module_imports_first_in_a_fresh_interpreter(module):
    """Before the fix, `import sparsekd_deploy.commands.engine` raised 'partially initialized module' (a cycle
    through cli.py); each command and pipeline module must import first, on its own."""
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
