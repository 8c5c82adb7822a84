"""The interpretability view of KSA summaries."""

import torch
from torchrec import KeyedJaggedTensor

from ksa_rec.data.batch import SequenceBatch
from ksa_rec.data.schema import DataSpec
from ksa_rec.models.explain import explain_user, plot_explanation
from ksa_rec.models.seqrec import SeqRecModel
from ksa_rec.modules.config import EncoderConfig
from ksa_rec.modules.losses import LossConfig


def _batch(n):
    items = torch.arange(n) % 50 + 2
    lengths = torch.tensor([n])
    kjt = KeyedJaggedTensor(keys=["item_id"], values=items, lengths=lengths, offsets=torch.tensor([0, n]))
    return SequenceBatch(features=kjt, offsets=torch.tensor([0, n]), positions=torch.arange(n), max_len=n,
                         user_index=torch.tensor([0]))


def test_weights_are_distributions_over_what_the_rule_allows(tmp_path):
    torch.manual_seed(0)
    cfg = EncoderConfig(dim=16, num_heads=2, pattern="ksa,full", chunk_size=4, window=2, dropout=0.0)
    model = SeqRecModel(cfg, LossConfig(), DataSpec(num_items=60))
    expl = explain_user(model, _batch(37))
    assert expl.layers == [0] and expl.summary_sources.shape == (1, 9, 4)
    # every summary's weights on its own chunk plus its own slot sum to 1 (S = 1: the rest is the slot)
    assert bool((expl.summary_sources.sum(-1) <= 1 + 1e-6).all())
    # the newest event (index 36, chunk 9) sees events of chunks 7..9 and summaries of chunks 0..6 only
    total = expl.event_usage[0].sum() + expl.summary_usage[0].sum()
    assert torch.allclose(total, torch.tensor(1.0), atol=1e-5)
    assert float(expl.event_usage[0][:28].abs().sum()) == 0.0
    assert float(expl.summary_usage[0][7:].abs().sum()) == 0.0 and float(expl.summary_usage[0][:7].min()) > 0
    chunk, weight, events = expl.top_summaries(0, top=1)[0]
    assert weight == float(expl.summary_usage[0].max())
    assert [e[0] for e in events] == list(range(4 * chunk, 4 * chunk + 4))
    assert plot_explanation(expl, tmp_path / "why.png").stat().st_size > 10_000
    assert plot_explanation(expl, tmp_path / "marked.png", mark=5).stat().st_size > 10_000
