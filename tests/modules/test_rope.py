"""RoPE: scores depend on position differences only, also far beyond training lengths."""

import torch

from ksa_rec.ops.rope import RotaryEmbedding, apply_rotary


def test_scores_are_shift_invariant_at_large_positions():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16)
    q, k = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    pos = torch.tensor([0, 3, 7, 8, 20])

    def scores(offset):
        cos, sin = rope.tables(pos + offset, torch.float32)
        return torch.einsum("qhd,khd->hqk", apply_rotary(q, cos, sin), apply_rotary(k, cos, sin))

    assert torch.allclose(scores(0), scores(1_000_003), atol=1e-4)


def test_rotation_preserves_norm():
    rope = RotaryEmbedding(8)
    x = torch.randn(4, 3, 8)
    cos, sin = rope.tables(torch.tensor([1, 50, 999, 123456]), torch.float32)
    assert torch.allclose(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-5)
