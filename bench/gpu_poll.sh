#!/usr/bin/env bash
# On the device, while bench/gpu_real_experiment.sh runs in the background (started by the shared
# tools' start.sh): wait up to $1 seconds for it, print where each phase stands and the short table,
# and copy everything measured so far into $OUT, so that a machine released before the end still
# leaves its figures behind. One device call: run(command="bash bench/gpu_poll.sh 520").
wait_s=${1:-520}
end=$(( $(date +%s) + wait_s ))
while [ "$(date +%s)" -lt $end ] && [ ! -f /tmp/job.rc ]; do sleep 5; done
echo "== $(( $(date +%s) - $(cat /tmp/job.t0 2>/dev/null || date +%s) )) s since start; rc=$(cat /tmp/job.rc 2>/dev/null || echo running)"
grep -E "^=== " /tmp/job.log | tail -n 12
for f in /tmp/bench_out/*.log; do [ -f "$f" ] && { echo "--- $(basename "$f")"; grep -vE "^\s*$" "$f" | grep -E "Error|error|Traceback|steps \(|Finished jobid|memory|\[side|\[bench" | cut -c1-240 | tail -n 6; }; done
(cd /tmp/proj && python3 bench/summarize_real_experiment.py /tmp/bench_out /tmp/ref/results /tmp/proj/results /tmp/gpumem.csv) 2>&1 | tail -n 60
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/bench_out" "$OUT/ref" "$OUT/smoke"
  cp /tmp/job.log /tmp/gpumem.csv "$OUT"/ 2>/dev/null
  cp /tmp/bench_out/*.log /tmp/bench_out/*.json /tmp/bench_out/*.md "$OUT/bench_out/" 2>/dev/null
  for m in /tmp/ref/results/runs/*/metrics.jsonl; do [ -f "$m" ] && cp "$m" "$OUT/ref/$(basename "$(dirname "$m")")-metrics.jsonl"; done
  cp /tmp/ref/results/logs/train/*.log "$OUT/ref/" 2>/dev/null
  for f in summary.md ci_table.csv accuracy.csv; do cp "/tmp/proj/results/$f" "$OUT/smoke/" 2>/dev/null; done
  cp -r /tmp/proj/results/runs "$OUT/smoke/" 2>/dev/null; rm -rf "$OUT"/smoke/runs/*/wandb
  cp -r /tmp/proj/results/logs/timing "$OUT/smoke/" 2>/dev/null
fi
