"""long-range.md 2l: all-KSA without the reconstruction loss against 2j's runs with it (and SCA), paired by seed.

Run from the repository root: python docs/results/raw/long-range-2l-paired.py
"""

import json
import math
import statistics as st

RAW = "docs/results/raw/"
no_loss = json.load(open(RAW + "long-range-2l-cpu-60ep-ksa-ksa-rec0-s01.json"))
no_loss.update(json.load(open(RAW + "long-range-2l-cpu-60ep-ksa-ksa-rec0-s23.json")))
runs_2j = json.load(open(RAW + "long-range-2j-cpu-60ep-all-seeds.json"))
BUCKETS = ["no_long_range", "dist_1_20", "dist_20_64", "dist_64_150", "dist_150_plus"]
T95 = {2: 12.706, 3: 4.303, 4: 3.182}  # two-sided 95% t quantiles by number of seeds
seeds = [s for s in range(4) if f"lr2-ksa,ksa[chunk]-s{s}" in no_loss]


def score(runs, name, seed, bucket):
    return runs[f"{name}-s{seed}"]["test"][f"{bucket}/ndcg@10"]


def ci(values):
    half = T95[len(values)] * st.stdev(values) / math.sqrt(len(values))
    return f"{st.mean(values):.4f} ± {half:.4f}"


for s in seeds:
    print(s, no_loss[f"lr2-ksa,ksa[chunk]-s{s}"]["fit"]["epochs"],
          " ".join(f"{score(no_loss, 'lr2-ksa,ksa[chunk]', s, b):.4f}" for b in BUCKETS))
print("no loss   ", " | ".join(ci([score(no_loss, "lr2-ksa,ksa[chunk]", s, b) for s in seeds]) for b in BUCKETS))
print("loss same ", " | ".join(ci([score(runs_2j, "lr2-ksa,ksa[chunk,rec0.3]", s, b) for s in seeds]) for b in BUCKETS))
print("diff      ", " | ".join(ci([score(no_loss, "lr2-ksa,ksa[chunk]", s, b)
                                   - score(runs_2j, "lr2-ksa,ksa[chunk,rec0.3]", s, b) for s in seeds])
                               for b in BUCKETS))
sca_seeds = [s for s in seeds if f"lr2-sca,sca-s{s}" in runs_2j]
print("vs sca    ", " | ".join(ci([score(no_loss, "lr2-ksa,ksa[chunk]", s, b) - score(runs_2j, "lr2-sca,sca", s, b)
                                   for s in sca_seeds]) for b in BUCKETS))
