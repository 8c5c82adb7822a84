#!/bin/bash
# Section 2j checkpoints: what each KSA layer of the all-KSA recipe reads, by distance of the evidence
cd /work/main
for s in 0 1; do
  for b in "1 20" "20 64" "64 150" "150 100000"; do
    set -- $b
    echo "== lr2-ksa,ksa[chunk]-s$s distance [$1, $2)"
    .venv/bin/python pipelines/explain_user.py --config configs/synthetic-long-cpu.yaml \
      --checkpoint "runs/long-range-cpu-summaries/lr2-ksa,ksa[chunk]-s$s" --targets 40 --min-distance $1 \
      --max-distance $2 -- --trainer.accelerator cpu 2>/dev/null | grep "^layer"
  done
done
