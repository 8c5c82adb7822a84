"""The auxiliary summary-reconstruction loss (``loss.summary_reconstruction``)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torchrec import KeyedJaggedTensor

from ksa_rec.data.batch import SequenceBatch
from ksa_rec.data.schema import DataSpec
from ksa_rec.models.seqrec import SeqRecModel
from ksa_rec.modules.config import EncoderConfig
from ksa_rec.modules.losses import LossConfig
from ksa_rec.utils.jagged import lengths_to_offsets, positions_in_segment

NUM_ITEMS = 40


def _batch(lengths: list[int], generator: torch.Generator) -> SequenceBatch:
    lens = torch.tensor(lengths)
    offsets = lengths_to_offsets(lens)
    items = torch.randint(2, NUM_ITEMS, (int(lens.sum()),), generator=generator)
    items[3] = 1  # an OOV event inside a complete chunk: never a reconstruction target
    targets = torch.roll(items, -1)
    targets[offsets[1:] - 1] = 0
    return SequenceBatch(features=KeyedJaggedTensor.from_lengths_sync(["item_id"], items, lens), offsets=offsets,
                         positions=positions_in_segment(offsets), max_len=max(lengths),
                         user_index=torch.arange(len(lengths)), targets=targets)


def _reference(model: SeqRecModel, batch: SequenceBatch) -> torch.Tensor:
    """The same loss written per summary: states entering layer 1, user by user, chunk by chunk."""
    seen = []
    # a block's input is the stream: the events, then the summaries
    hook = model.encoder.blocks[1].register_forward_pre_hook(
        lambda _, args: seen.append(args[0][args[1].num_events:]))
    model.encode(batch)
    hook.remove()
    states, k, S = seen[0], model.encoder_cfg.chunk_size, model.encoder_cfg.summary_tokens
    items = batch.features["item_id"].values()
    terms, row = [], 0
    for u in range(batch.batch_size):
        start, n = int(batch.offsets[u]), int(batch.offsets[u + 1] - batch.offsets[u])
        for c in range(n // k):
            for j in range(S):
                logits = model.encoder.final_norm(states[row]) @ model.item_weight.t()
                logits[:2] = float("-inf")
                for i in range(c * k + j * (k // S), c * k + (j + 1) * (k // S)):
                    if int(items[start + i]) > 1:
                        terms.append(-F.log_softmax(logits, -1)[items[start + i]])
                row += 1
    assert row == states.shape[0]
    return torch.stack(terms).mean()


def test_adds_the_weighted_per_summary_reconstruction_of_its_chunk_slice():
    torch.manual_seed(0)
    cfg = EncoderConfig(dim=16, num_heads=2, pattern="ksa,ksa", chunk_size=4, window=1, summary_tokens=2, dropout=0.0)
    model = SeqRecModel(cfg, LossConfig(summary_reconstruction=0.5), DataSpec(num_items=NUM_ITEMS)).eval()
    batch = _batch([11, 9, 3], torch.Generator().manual_seed(1))
    with torch.no_grad():
        with_aux = model.loss(batch)
        model.loss_cfg = dataclasses.replace(model.loss_cfg, summary_reconstruction=0.0)
        without = model.loss(batch)
        reference = _reference(model, batch)
    assert float(with_aux - without) == pytest.approx(0.5 * float(reference), rel=1e-5)


def test_gradient_reaches_the_summary_stream_of_the_first_layer():
    torch.manual_seed(0)
    cfg = EncoderConfig(dim=16, num_heads=2, pattern="ksa,ksa", chunk_size=4, window=1, dropout=0.0)
    model = SeqRecModel(cfg, LossConfig(summary_reconstruction=1.0), DataSpec(num_items=NUM_ITEMS))
    batch = _batch([13, 8], torch.Generator().manual_seed(2))
    model.summary_reconstruction_loss(batch, _summaries_read(model, batch)).backward()
    assert float(model.encoder.summary_embedding.grad.abs().sum()) > 0
    assert float(model.item_weight.grad.abs().sum()) > 0


def _summaries_read(model: SeqRecModel, batch: SequenceBatch) -> list[torch.Tensor]:
    read: list[torch.Tensor] = []
    model.encode(batch, read)
    assert len(read) == 1  # "ksa,ksa": only layer 1 reads summaries that carry content
    return read


def test_no_complete_chunk_gives_zero():
    cfg = EncoderConfig(dim=16, num_heads=2, pattern="ksa,ksa", chunk_size=4, window=1, dropout=0.0)
    model = SeqRecModel(cfg, LossConfig(summary_reconstruction=1.0), DataSpec(num_items=NUM_ITEMS))
    batch = _batch([3, 2], torch.Generator().manual_seed(3))
    assert float(model.summary_reconstruction_loss(batch, _summaries_read(model, batch)).detach()) == 0.0


def test_refused_where_no_layer_reads_summary_content():
    with pytest.raises(ValueError, match="loss.summary_reconstruction needs a layer that reads summaries carrying"):
        SeqRecModel(EncoderConfig(pattern="ksa,full", chunk_size=4, window=1),
                    LossConfig(summary_reconstruction=1.0), DataSpec(num_items=NUM_ITEMS))


def test_chunk_seeded_first_layer_summaries_count_as_content():
    """With summary_init: chunk the first ksa layer's summaries already pool their chunk: ksa,full may use the
    loss, and ksa,ksa reconstructs from both layers' summary inputs."""
    loss = LossConfig(summary_reconstruction=1.0)
    SeqRecModel(EncoderConfig(pattern="ksa,full", chunk_size=4, window=1, summary_init="chunk"), loss,
                DataSpec(num_items=NUM_ITEMS))
    cfg = EncoderConfig(dim=16, num_heads=2, pattern="ksa,ksa", chunk_size=4, window=1, dropout=0.0,
                        summary_init="chunk")
    model = SeqRecModel(cfg, loss, DataSpec(num_items=NUM_ITEMS))
    batch = _batch([9, 13], torch.Generator().manual_seed(5))
    read = []
    model.encode(batch, read)
    assert len(read) == 2
    assert float(model.summary_reconstruction_loss(batch, read).detach()) > 0.0
    with pytest.raises(ValueError, match="loss.summary_reconstruction"):
        LossConfig(summary_reconstruction=-1.0)
