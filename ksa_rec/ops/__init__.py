"""Attention ops. Each op lives in its own folder with a torch reference and faster peers behind one
dispatcher: ``ksa_attention`` (KSA, SCA and full layers with a summary stream),
``sliding_window_attention`` (token-window SWA) and ``causal_attention`` (full causal, SDPA)."""

from ksa_rec.ops.causal import causal_attention
from ksa_rec.ops.ksa import ksa_attention
from ksa_rec.ops.swa import sliding_window_attention

__all__ = ["causal_attention", "ksa_attention", "sliding_window_attention"]
