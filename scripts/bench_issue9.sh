#!/usr/bin/env bash
# Issue 9's measurements in one sequential run (one heavy job at a time on a 2-core machine), each step cached so
# a stopped run resumes: the matrix (demo + wide), allocation at unstructured 0.7, the wide teacher's learning-rate
# sweep for the default 2:4 recipe (its lr 5e-4 cell is the matrix's wide 2:4 oneshot-kd row), unstructured:auto at
# a KL budget of 0.05, and one-shot + KD + load-path at 0.8 (what allocation buys without staging).
#   scripts/bench_issue9.sh [STEPS]   (default 90 optimizer steps per trained run)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
STEPS=${1:-90}
$PY scripts/bench_matrix.py --steps "$STEPS" --threads 1
$PY scripts/bench_matrix.py --steps "$STEPS" --threads 1 --models demo --patterns unstructured:0.7 \
    --methods oneshot-kd staged staged-loadpath --out runs/bench_alloc07
# The default recipe at 2:4 is one stage (the oneshot-kd row); its lr sweep on the teacher it was not tuned on:
for lr in 0.00025 0.001 0.002; do
  $PY scripts/bench_matrix.py --steps "$STEPS" --threads 1 --models wide --patterns 2:4 --methods oneshot-kd \
      --lr "$lr" --out "runs/bench_lr_sweep/lr$lr"
done
.venv/bin/sparsekd-deploy distill --pattern unstructured:auto --kl-budget 0.05 --steps-per-stage 60 \
    --retries 0 --out runs/auto-005 --overwrite --json > runs/auto-005.json
$PY scripts/bench_matrix.py --steps "$STEPS" --threads 1 --models demo --patterns unstructured:0.8 \
    --methods oneshot-kd-loadpath
# Channels 0.5 (issue 9's channel bar): staging variants, gradual demolition, Fisher scores, the LS refit and the
# default recipe, side by side with the one-shot Wanda + KD reference on both teachers.
$PY scripts/bench_matrix.py --steps "$STEPS" --threads 1 --models demo --patterns channels:0.5 --methods oneshot-kd \
    staged staged2 oneshot-kd-gradual staged-gradual fisher oneshot-kd-fisher staged2-fisher wanda-ls fisher-ls \
    oneshot-kd-fisher-ls staged2-fisher-ls staged-fisher-ls default
$PY scripts/bench_matrix.py --steps "$STEPS" --threads 1 --models wide --patterns channels:0.5 --methods oneshot-kd \
    staged fisher oneshot-kd-fisher staged2-fisher fisher-ls oneshot-kd-fisher-ls staged-fisher-ls default
