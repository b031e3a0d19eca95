#!/usr/bin/env bash
# The GPU smoke run (issue 16.4) and the packed train-step study (16.1), one background job on the
# lent GPU machine. Started by the shared tools, which install the wheelhouse and copy the tree:
#   run: bash .gpu/bin/start.sh 'bash bench/gpu_smoke.sh'   carry: .gpu/cN .gpu/bin .gpu/gsm8k
# Elsewhere (your own GPU machine with the gpu extra installed): bash bench/gpu_smoke.sh
# Prints a short table last (bench/summarize_smoke.py); BENCHMARKS.md records the figures.
set -u
OUT_DIR=${BENCH_OUT:-/tmp/bench_out}
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout -k 10 300 python3 bench/check_packing_gpu.py 2>&1 | grep -E "packing check|Error|error" | tail -8
t0=$(date +%s)
timeout -k 10 ${DAG_LIMIT_S:-900} /usr/bin/time -v python3 -m snakemake --cores all \
  --configfile config/gpu-smoke.yaml --resources gpu=1 > "$OUT_DIR/dag.log" 2>&1
echo "=== dag rc=$? wall=$(( $(date +%s) - t0 )) s"
grep -E "Maximum resident|Elapsed \(wall" "$OUT_DIR/dag.log"
if [ "${SKIP_STUDY:-0}" != 1 ]; then
  timeout -k 10 ${STUDY_LIMIT_S:-300} python3 bench/bench_train_step.py --variants mixstudy \
    --backends default --single-shapes 8x1024 --no-grad-check --budget-s 240 --out "$OUT_DIR" \
    > "$OUT_DIR/train_step.log" 2>&1
  echo "=== train-step study rc=$?"
fi
python3 bench/summarize_smoke.py results "$OUT_DIR"
