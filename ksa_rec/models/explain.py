"""Referential retention, made visible: for one user, which old events each KSA summary draws on, and
which summaries (and raw events) the newest prediction reads.

    expl = explain_user(model, batch)          # batch: one user's history (a SequenceBatch of B = 1)
    expl.top_summaries(layer=0, top=3)         # [(chunk, weight, [(event index, item id, weight), ...])]
    plot_explanation(expl, "why.png")

Weights are attention probabilities averaged over heads, recomputed densely from each KSA layer's own
projections (fine for one user of a few thousand events; not a serving path).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ksa_rec.data.batch import SequenceBatch
from ksa_rec.data.schema import ITEM
from ksa_rec.models.seqrec import SeqRecModel


@dataclass
class KsaExplanation:
    layers: list[int]
    """Indices of the ksa layers explained (the rows of the tensors below)."""
    item_ids: Tensor
    """int64 ``[n]`` the user's events."""
    positions: Tensor
    """int64 ``[n]`` their absolute indices."""
    summary_sources: Tensor
    """``[L, C, k]``: weight summary slot 0 of chunk c puts on each event of chunk c."""
    summary_usage: Tensor
    """``[L, C]``: weight the newest event puts on each chunk's summaries (its slots summed)."""
    event_usage: Tensor
    """``[L, n]``: weight the newest event puts on each raw event."""

    def top_summaries(self, layer: int = 0, top: int = 3) -> list[tuple[int, float, list[tuple[int, int, float]]]]:
        """The ``top`` summaries the newest event leaned on in ``layer`` (row index), best first, each with
        its chunk's events as (absolute index, item id, weight of the summary on it)."""
        usage = self.summary_usage[layer]
        k = self.summary_sources.shape[2]
        out = []
        for chunk in usage.argsort(descending=True)[:top].tolist():
            events = [(int(self.positions[chunk * k + j]), int(self.item_ids[chunk * k + j]),
                       float(self.summary_sources[layer, chunk, j])) for j in range(k)]
            out.append((chunk, float(usage[chunk]), events))
        return out


@torch.no_grad()
def explain_user(model: SeqRecModel, batch: SequenceBatch) -> KsaExplanation:
    """Explain the newest event of the single user in ``batch`` (model in eval mode)."""
    if batch.batch_size != 1:
        raise ValueError(f"explain_user takes one user, got a batch of {batch.batch_size}")
    cfg = model.encoder_cfg
    explained = [i for i, block in enumerate(model.encoder.blocks) if block.attn.reads_summaries]
    if not explained:
        raise ValueError(f"pattern {cfg.pattern!r} has no layer that reads summaries to explain")
    captured: dict[int, tuple] = {}
    hooks = [model.encoder.blocks[i].attn.register_forward_hook(
        lambda mod, args, out, i=i: captured.__setitem__(i, args)) for i in explained]
    try:
        model.eval()
        model.encode(batch)
    finally:
        for hook in hooks:
            hook.remove()
    n, k, S = int(batch.offsets[-1]), cfg.chunk_size, cfg.summary_tokens
    C = n // k
    # Every token of the user by identity: its events, then its summaries (chunk-major).
    ident = torch.cat([torch.arange(n), torch.arange(C * S)]).to(batch.offsets.device)
    is_summary = torch.arange(n + C * S, device=ident.device) >= n
    sources, usage, events = [], [], []
    for i in sorted(captured):
        h, layout = captured[i]
        attn = model.encoder.blocks[i].attn
        queries, keys, _ = attn.project(h, layout.num_events, layout.cos, layout.sin)
        scores = torch.einsum("qhd,khd->hqk", queries, keys) * queries.shape[-1] ** -0.5
        mask = attn.rule(True).visible(ident[:, None], is_summary[:, None], ident[None], is_summary[None])
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).mean(0)  # [n+CS, n+CS]
        slot0 = n + torch.arange(C, device=h.device) * S
        chunk_events = (torch.arange(C, device=h.device) * k)[:, None] + torch.arange(k, device=h.device)
        sources.append(weights[slot0[:, None], chunk_events])
        usage.append(weights[n - 1, n:].reshape(C, S).sum(1) if C else weights.new_zeros(0))
        events.append(weights[n - 1, :n])
    return KsaExplanation(layers=sorted(captured), item_ids=batch.features[ITEM].values().cpu(),
                          positions=batch.positions.cpu(), summary_sources=torch.stack(sources).cpu(),
                          summary_usage=torch.stack(usage).cpu(), event_usage=torch.stack(events).cpu())


def plot_explanation(expl: KsaExplanation, path: str | Path, layer: int = 0, top: int = 3,
                     mark: int | None = None) -> Path:
    """Two panels: what the newest event reads over the history (raw events and summaries, by position),
    and, for its ``top`` summaries, the weight each puts on the events of its chunk. ``mark``: an event
    index to flag in the first panel (e.g. where the evidence for the next item lies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = expl.summary_sources.shape[2]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), constrained_layout=True)
    pos = expl.positions.numpy()
    ax1.bar(pos, expl.event_usage[layer].numpy(), width=1.0, color="tab:blue", label="raw events (window)")
    chunk_pos = pos[::k][: expl.summary_usage.shape[1]] + k / 2
    ax1.bar(chunk_pos, expl.summary_usage[layer].numpy(), width=k, color="tab:orange", alpha=0.8,
            label="summaries (one per chunk)")
    if mark is not None:
        ax1.axvline(mark, color="tab:red", linestyle="--", label=f"event {mark}")
    ax1.set(title=f"what the newest event reads (ksa layer {expl.layers[layer]})", xlabel="event index",
            ylabel="attention weight")
    ax1.legend()
    best = expl.top_summaries(layer, top)
    for rank, (chunk, weight, events) in enumerate(best):
        ax2.bar([rank * (k + 1) + j for j in range(k)], [w for _, _, w in events],
                label=f"chunk {chunk} ({weight:.2f})")
        for j, (_, item, w) in enumerate(events):
            ax2.text(rank * (k + 1) + j, w, str(item), ha="center", va="bottom", fontsize=7, rotation=90)
    ax2.set(title=f"what its top {len(best)} summaries draw on (bars: events of the chunk, labels: item ids)",
            ylabel="summary attention weight", xticks=[])
    ax2.legend()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
