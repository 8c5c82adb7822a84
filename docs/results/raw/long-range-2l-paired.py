import json, statistics as st, math
a = json.load(open('docs/results/raw/long-range-2l-cpu-60ep-ksa-ksa-rec0-s01.json'))
a.update(json.load(open('docs/results/raw/long-range-2l-cpu-60ep-ksa-ksa-rec0-s23.json')))
b = json.load(open('docs/results/raw/long-range-2j-cpu-60ep-all-seeds.json'))
bk = ['no_long_range', 'dist_1_20', 'dist_20_64', 'dist_64_150', 'dist_150_plus']
T = {2: 12.706, 3: 4.303, 4: 3.182}
seeds = [s for s in range(4) if f'lr2-ksa,ksa[chunk]-s{s}' in a]
for s in seeds:
    x = a[f'lr2-ksa,ksa[chunk]-s{s}']['test']
    print(s, a[f'lr2-ksa,ksa[chunk]-s{s}']['fit']['epochs'], ' '.join('%.4f' % x[f'{k}/ndcg@10'] for k in bk))
def ci(v):
    return '%.4f ± %.4f' % (st.mean(v), T[len(v)] * st.stdev(v) / math.sqrt(len(v)))
print('no loss   ', ' | '.join(ci([a[f'lr2-ksa,ksa[chunk]-s{s}']['test'][f'{k}/ndcg@10'] for s in seeds]) for k in bk))
print('loss same ', ' | '.join(ci([b[f'lr2-ksa,ksa[chunk,rec0.3]-s{s}']['test'][f'{k}/ndcg@10'] for s in seeds]) for k in bk))
print('diff      ', ' | '.join(ci([a[f'lr2-ksa,ksa[chunk]-s{s}']['test'][f'{k}/ndcg@10'] - b[f'lr2-ksa,ksa[chunk,rec0.3]-s{s}']['test'][f'{k}/ndcg@10'] for s in seeds]) for k in bk))
print('vs sca    ', ' | '.join(ci([a[f'lr2-ksa,ksa[chunk]-s{s}']['test'][f'{k}/ndcg@10'] - b[f'lr2-sca,sca-s{s}']['test'][f'{k}/ndcg@10'] for s in seeds if f'lr2-sca,sca-s{s}' in b]) for k in bk))
