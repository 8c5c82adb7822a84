"""The cached (serving) form of KSA against the dense oracle: queries at the newest tokens, keys from a
cache holding every earlier token or only what a state keeps."""

import random

import pytest
import torch

from ksa_rec.ops.ksa import KsaRule
from ksa_rec.ops.ksa.cached import KeyRows, QueryRows, ksa_cached_attention
from ksa_rec.ops.ksa.dense import ksa_dense
from ksa_rec.ops.ksa.layout import summary_offsets
from ksa_rec.utils.jagged import lengths_to_offsets


def _history(lengths, k, S, H=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    offsets = lengths_to_offsets(torch.tensor(lengths))
    s_off = summary_offsets(offsets, k, S)
    ev = [torch.randn(int(offsets[-1]), H, D, generator=g, dtype=torch.float64) for _ in range(3)]
    sm = [torch.randn(int(s_off[-1]), H, D, generator=g, dtype=torch.float64) for _ in range(3)]
    return ev, sm, offsets, s_off


def _gather(rows_per_user):
    rows = [torch.as_tensor(r, dtype=torch.long) for r in rows_per_user]
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long), lengths_to_offsets(
        torch.tensor([len(r) for r in rows]))


@pytest.mark.parametrize("users", [1, 5])  # one user: the unpadded path
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("window,S,M", [(2, 1, None), (0, 1, None), (1, 2, None), (None, 1, None), (2, 1, 1),
                                        (3, 0, None)])
def test_newest_tokens_against_dense(users, seed, window, S, M):
    rnd = random.Random(seed)
    k = 4
    lengths = [rnd.choice([1, 3, 4, 5, 8, 17, 40, 61]) for _ in range(users)]
    (q, kk, v), (qs, ks, vs), offsets, s_off = _history(lengths, k, S, seed=seed)
    ref, ref_sum = ksa_dense(q, kk, v, qs, ks, vs, offsets, chunk_size=k, window=window, summary_tokens=S,
                             max_summaries=M)
    # Queries: each user's last `new` events and the summaries of chunks those events complete.
    q_src = []
    for b, n in enumerate(lengths):
        new = rnd.randint(1, n)
        rows = []
        for i in range(n - new, n):
            rows.append(("e", int(offsets[b]) + i, i))
            if S and (i + 1) % k == 0:
                for j in range(S):
                    sid = (i // k) * S + j
                    rows.append(("s", int(s_off[b]) + sid, sid))
        q_src.append(rows)
    qq = torch.stack([q[r] if kind == "e" else qs[r] for rows in q_src for kind, r, _ in rows])
    q_index = torch.tensor([idx for rows in q_src for _, _, idx in rows])
    q_is_sum = torch.tensor([kind == "s" for rows in q_src for kind, _, _ in rows])
    q_offsets = lengths_to_offsets(torch.tensor([len(r) for r in q_src]))
    expected = torch.stack([ref[r] if kind == "e" else ref_sum[r] for rows in q_src for kind, r, _ in rows])
    # Cache: every event and every summary (in shuffled order: the rule must not depend on order).
    k_rows, k_off = _gather([rnd.sample(range(int(offsets[b]), int(offsets[b + 1])), n) for b, n in enumerate(lengths)])
    s_rows, s_offs = _gather([list(range(int(s_off[b]), int(s_off[b + 1]))) for b in range(len(lengths))])
    k_index = torch.cat([torch.as_tensor(r) - int(offsets[b]) for b, r in enumerate(
        [k_rows[k_off[b]:k_off[b + 1]] for b in range(len(lengths))])])
    s_index = s_rows - torch.cat([torch.full((int(s_off[b + 1] - s_off[b]),), int(s_off[b]))
                                  for b in range(len(lengths))])
    got = ksa_cached_attention(qq, QueryRows(q_offsets, q_index, q_is_sum),
                               KeyRows(k_off, k_index, kk[k_rows], v[k_rows]),
                               KeyRows(s_offs, s_index, ks[s_rows], vs[s_rows]), KsaRule(k, window, S, M))
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
