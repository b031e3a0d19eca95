#!/usr/bin/env bash
# The real experiment's GPU checks (issues 25, 27.1, 29) as one background job on one 80 GB GPU:
#   ratio      bench/check_ratio_gpu.py: mb0 ratio at staleness 0 (must be exactly 1) and 1, bf16, packed
#   reference  config/qwen2.5-math-1.5b-1gpu.yaml as shipped except the hub model (a random-init
#              Qwen2.5-Math-1.5B-shape model, real 151,936 vocabulary), the gold teacher (no API key
#              there) and 5 GRPO-clip steps at 512 rollouts x up to 2,048 tokens; memory plan + peaks
#   smoke      config/gpu-smoke.yaml as shipped: the whole DAG
#   side       bench/trl_grpo_side_by_side.py from its printed command (mathpt vs TRL GRPOTrainer)
#   algos      bench/bench_algorithms.py: one PG update per algorithm at the 1.5B shape
# Started by the shared tools (they install the wheelhouse and copy the tree to /tmp/proj):
#   run: bash .gpu/bin/start.sh 'bash bench/gpu_real_experiment.sh'  carry: .gpu/cN .gpu/bin .gpu/gsm8k .benchsnap
# Needs .benchsnap/model1p5b made here first: python bench/make_bench_model_dir.py --out .benchsnap/model1p5b
# PHASES="ratio reference" runs a subset. The table at the end of /tmp/job.log is what BENCHMARKS.md copies.
set -u
cd /tmp/proj
export BENCH_OUT=${BENCH_OUT:-/tmp/bench_out}
export VLLM_CACHE_ROOT=/tmp/vllm_cache   # one compile cache for every phase
mkdir -p "$BENCH_OUT"
PHASES=${PHASES:-ratio prepare reference smoke side algos}
M=/tmp/bm
ph() {
  local name=$1 lim=$2; shift 2
  case " $PHASES " in *" $name "*) ;; *) return ;; esac
  echo "=== $name start $(date +%s)"
  timeout -k 10 "$lim" "$@" > "$BENCH_OUT/$name.log" 2>&1
  echo "=== $name rc=$? end $(date +%s)"
  grep -E "^mb0|^\[side_by_side|^\[bench_algorithms|memory|Error|error" "$BENCH_OUT/$name.log" | cut -c1-300 | tail -n 12
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
ph ratio 240 python3 bench/check_ratio_gpu.py
ph prepare 180 python3 bench/bench_rollout.py prepare --model-dir .benchsnap/model1p5b --out $M
REF=/tmp/ref
rm -rf $REF && mkdir -p $REF && cp -r Snakefile rules scripts config report profiles envs $REF/
cat > $REF/gpu-reference.yaml <<EOF
model: {kind: pretrained, path: $M}
teacher: {kind: gold, keep: all}
data: {limits: {train: 2048, val: 64, test: 64}}
train:
  seeds: [0]
  algorithms: [grpo_clip]
  pg: {n_steps: 5, eval_every: 5, checkpoint_every: 5}
EOF
ph reference 840 bash -c "cd $REF && python3 -m snakemake results/checkpoints/grpo_clip-seed0 --cores all \
  --resources gpu=1 --configfile config/qwen2.5-math-1.5b-1gpu.yaml gpu-reference.yaml"
ph smoke 1200 python3 -m snakemake --cores all --configfile config/gpu-smoke.yaml --resources gpu=1
ph side 600 python3 bench/trl_grpo_side_by_side.py --model $M --out "$BENCH_OUT"
ph algos 420 python3 bench/bench_algorithms.py --device cuda
python3 bench/summarize_real_experiment.py "$BENCH_OUT" $REF/results results /tmp/gpumem.csv
