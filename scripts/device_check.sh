#!/usr/bin/env bash
# Run on a GPU machine (≤ 8 minutes on one H100/H200): the issue-4 speedup benchmark, the issue-12 MFU benchmark and
# every test marked gpu/tensorrt that the machine can run; writes a JSON summary. Usage: scripts/device_check.sh [OUT_DIR]
#
# On a machine with no network whose image has PyTorch CUDA but other versions of transformers & co (the lent
# H100/H200): run scripts/device_wheels.sh here first, carry .device-wheels, and this script installs them into a
# folder put first on PYTHONPATH (the image's python3 is itself a venv: a venv made from it would not see its torch).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-device-check}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
if [ ! -x "$PY" ] && [ -d .device-wheels ]; then
  python3 -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/skd-site .device-wheels/*.whl \
    > "$OUT/install.log" 2>&1
  export PYTHONPATH=/tmp/skd-site
  PY=python3
fi
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package from this checkout, no build step needed
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)" > "$OUT/env.txt" 2>&1
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
timeout 80 "$PY" scripts/bench_gpu.py --json "$OUT/bench_gpu.json" > "$OUT/bench_gpu.log" 2>&1
bench_rc=$?
# Only the files that hold gpu/tensorrt tests: collecting the whole suite would import what the image lacks (asyncssh).
files=$(grep -l -E "mark\.(gpu|tensorrt)" tests/test_*.py)
timeout 60 "$PY" -m pytest -q -p no:cacheprovider -m "gpu or tensorrt" -rfEs --junitxml="$OUT/pytest.xml" $files \
  > "$OUT/pytest.log" 2>&1
tests_rc=$?
timeout 80 "$PY" scripts/bench_gpu.py --backend cutlass --json "$OUT/bench_gpu_cutlass.json" > "$OUT/bench_gpu_cutlass.log" 2>&1
timeout 240 "$PY" scripts/bench_mfu.py --json "$OUT/bench_mfu.json" > "$OUT/bench_mfu.log" 2>&1
mfu_rc=$?
# The onnxruntime target's query-block attention (If / Loop) on ORT's CUDA provider, where present (unmeasured so far).
timeout 60 "$PY" scripts/bench_ort_attention.py --provider cuda --runs 10 > "$OUT/bench_ort_attention_cuda.log" 2>&1
"$PY" - "$OUT" "$tests_rc" "$bench_rc" "$mfu_rc" <<'PYEOF'
import json, pathlib, re, sys
out, tests_rc, bench_rc, mfu_rc = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
log = (out / "pytest.log").read_text(errors="replace")
summary = {
    "env": (out / "env.txt").read_text().strip() if (out / "env.txt").exists() else None,
    "gpu": (out / "gpu.csv").read_text().strip().splitlines()[-1] if (out / "gpu.csv").exists() else None,
    "tests_exit_code": tests_rc, "tests_tail": log.strip().splitlines()[-1] if log.strip() else "",
    "skipped": re.findall(r"SKIPPED \[\d+\] (.*)", log),
    "failed": re.findall(r"^(?:FAILED|ERROR) (.*)", log, re.M),
    "bench_exit_code": bench_rc,
    "bench": json.loads((out / "bench_gpu.json").read_text()) if (out / "bench_gpu.json").exists() else None,
    "bench_cutlass": json.loads((out / "bench_gpu_cutlass.json").read_text()) if (out / "bench_gpu_cutlass.json").exists() else None,
    "mfu_exit_code": mfu_rc,
    "mfu": json.loads((out / "bench_mfu.json").read_text()) if (out / "bench_mfu.json").exists() else None,
    "ort_attention_cuda": (out / "bench_ort_attention_cuda.log").read_text(errors="replace").strip().splitlines()
    if (out / "bench_ort_attention_cuda.log").exists() else None,
}
try:
    import tensorrt
    summary["tensorrt"] = tensorrt.__version__
except ImportError:
    summary["tensorrt"] = None
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PYEOF
