#!/bin/bash
# long-range.md 2k / 2l: what each KSA layer of a trained long-range run reads, by distance of the evidence.
# Usage (repository root): bash docs/results/raw/long-range-explain-by-distance.sh RUN SEED...
#   2k: RUN='lr2-ksa,ksa[chunk,rec0.3]' seeds 0 1 2 3 4   (log: long-range-2j-explain-cpu-2026-12-07-s6.log)
#   2l: RUN='lr2-ksa,ksa[chunk]'        seeds 0 1         (log: long-range-2l-explain-cpu-2026-12-07-s6.log)
run=$1; shift
for s in "$@"; do
  for b in "1 20" "20 64" "64 150" "150 100000"; do
    set -- $b
    echo "== $run-s$s distance [$1, $2)"
    .venv/bin/python pipelines/explain_user.py --config configs/synthetic-long-cpu.yaml \
      --checkpoint "runs/long-range-cpu-summaries/$run-s$s" --targets 40 --min-distance $1 \
      --max-distance $2 -- --trainer.accelerator cpu 2>/dev/null | grep "^layer"
  done
done
