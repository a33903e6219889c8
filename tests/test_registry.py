import subprocess
import sys
from pathlib import Path

import pytest

from sparsekd_deploy.registry import Registry, UnknownNameError

TESTS = Path(__file__).parent


def test_registry_rules():
    r = Registry("widget")
    r.register("a")(1)
    with pytest.raises(RuntimeError, match="registered twice"):
        r.register("a")(2)
    with pytest.raises(UnknownNameError, match="unknown widget 'b'; available: a"):
        r.get("b")


def test_every_registered_plugin_has_a_test():
    """A new pattern, criterion, operator, loss or target without a test fails here."""
    import sparsekd_deploy.targets.onnxruntime  # noqa: F401
    import sparsekd_deploy.targets.tensorrt  # noqa: F401
    import sparsekd_deploy.targets.torch_cuda  # noqa: F401
    from sparsekd_deploy.core.importance import IMPORTANCE
    from sparsekd_deploy.core.losses import LOSSES
    from sparsekd_deploy.core.operators import OPERATORS
    from sparsekd_deploy.core.patterns import PATTERNS
    from sparsekd_deploy.targets.base import TARGETS

    text = "\n".join(p.read_text() for p in TESTS.glob("test_*.py") if p.name != Path(__file__).name)
    spellings = {"nm": "2:4", "unstructured": "unstructured:", "channels": "channels:"}
    missing = [f"{reg.kind} {name}" for reg in (IMPORTANCE, LOSSES, OPERATORS, PATTERNS, TARGETS)
               for name in reg.names() if spellings.get(name, name) not in text]
    assert not missing, f"no test mentions: {missing}"


def test_import_and_help_stay_light():
    """`import sparsekd_deploy` and `--help` must work without TensorRT / onnxruntime / CUDA paths."""
    code = ("import sys, sparsekd_deploy, sparsekd_deploy.cli\n"
            "from click.testing import CliRunner\n"
            "assert CliRunner().invoke(sparsekd_deploy.cli.main, ['--help']).exit_code == 0\n"
            "heavy = [m for m in ('tensorrt', 'onnxruntime', 'optimum', 'torch') if m in sys.modules]\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
