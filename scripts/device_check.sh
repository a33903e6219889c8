#!/usr/bin/env bash
# Run on a GPU machine (≤ 8 minutes on one H100/H200): every test marked gpu/tensorrt that the machine can run,
# plus the speedup benchmark; writes a JSON summary. Usage: scripts/device_check.sh [OUT_DIR]
#
# On a machine with no network whose image has PyTorch CUDA but other versions of transformers & co (the lent
# H100/H200): run scripts/device_wheels.sh here first, carry .device-wheels, and this script installs them into
# a venv layered over the image's packages (its CUDA torch stays in use).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-device-check}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
if [ ! -x "$PY" ] && [ -d .device-wheels ]; then
  python3 -m venv --system-site-packages /tmp/skd-venv
  /tmp/skd-venv/bin/python -m pip install --quiet --no-index --no-deps .device-wheels/*.whl > "$OUT/install.log" 2>&1
  PY=/tmp/skd-venv/bin/python
fi
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package from this checkout, no build step needed
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)" > "$OUT/env.txt" 2>&1
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
timeout 300 "$PY" -m pytest -q -m "gpu or tensorrt" -rs --junitxml="$OUT/pytest.xml" > "$OUT/pytest.log" 2>&1
tests_rc=$?
timeout 150 "$PY" scripts/bench_gpu.py --json "$OUT/bench_gpu.json" > "$OUT/bench_gpu.log" 2>&1
bench_rc=$?
"$PY" - "$OUT" "$tests_rc" "$bench_rc" <<'PYEOF'
import json, pathlib, re, sys
out, tests_rc, bench_rc = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
log = (out / "pytest.log").read_text(errors="replace")
summary = {
    "env": (out / "env.txt").read_text().strip() if (out / "env.txt").exists() else None,
    "gpu": (out / "gpu.csv").read_text().strip().splitlines()[-1] if (out / "gpu.csv").exists() else None,
    "tests_exit_code": tests_rc, "tests_tail": log.strip().splitlines()[-1] if log.strip() else "",
    "skipped": re.findall(r"SKIPPED \[\d+\] (.*)", log),
    "bench_exit_code": bench_rc,
    "bench": json.loads((out / "bench_gpu.json").read_text()) if (out / "bench_gpu.json").exists() else None,
}
try:
    import tensorrt
    summary["tensorrt"] = tensorrt.__version__
except ImportError:
    summary["tensorrt"] = None
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PYEOF
