#!/usr/bin/env bash
# Every GPU measurement of issues 14.1, 16 and 17 in one background job on the lent GPU machine.
# Started by the shared tools (they install the wheelhouse and copy the tree to /tmp/proj):
#   run: bash .gpu/bin/start.sh 'bash bench/gpu_suite.sh'   carry: .gpu/cN .gpu/bin .gpu/gsm8k .benchsnap
# Needs .benchsnap/ made here first: model1p5b/ (bench/make_bench_model_dir.py) and head/ (the
# committed mathpt/ and config/ to measure, so half-finished edits in a shared checkout don't).
# Results: /tmp/bench_out/*.jsonl + one log per phase; the table at the end of /tmp/job.log.
set -u
cd /tmp/proj
export BENCH_OUT=${BENCH_OUT:-/tmp/bench_out}
mkdir -p "$BENCH_OUT"
if [ -d .benchsnap/head/mathpt ]; then rm -rf mathpt config && cp -r .benchsnap/head/mathpt .benchsnap/head/config .; fi
export VLLM_CACHE_ROOT=/tmp/vllm_cache_suite   # one compile cache for every phase: cold in the first, warm after
M=/tmp/bm
ph() {
  local name=$1 lim=$2; shift 2
  echo "=== $name start $(date +%s)"
  timeout -k 10 "$lim" "$@" > "$BENCH_OUT/$name.log" 2>&1
  echo "=== $name rc=$? end $(date +%s)"
  grep -E "^\[bench_rollout|^\[side_by_side|Error|error" "$BENCH_OUT/$name.log" | cut -c1-400 | tail -n 12
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
ph prepare 200 python3 bench/bench_rollout.py prepare --model-dir .benchsnap/model1p5b --out $M
ph engine_inproc 540 python3 bench/bench_rollout.py engine --model $M --label inproc \
  --variants seeded,pipeline,noseed,noseed_flat,noseed_nolp,bare
ph engine_mp 300 python3 bench/bench_rollout.py engine --model $M --label mp --mp --variants mp_seeded,mp_bare
ph gap 300 python3 bench/bench_rollout.py gap --model $M
ph side_by_side 1100 python3 bench/trl_grpo_side_by_side.py --model $M --out "$BENCH_OUT" ${SIDE_ARGS:-}
python3 bench/summarize_gpu_suite.py "$BENCH_OUT" /tmp/gpumem.csv /tmp/job.log
