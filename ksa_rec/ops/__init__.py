"""Attention ops. Each op lives in its own folder with a torch reference and faster peers behind one
dispatcher: ``ksa_attention`` (KSA, SCA and full layers with a summary stream)."""

from ksa_rec.ops.ksa import ksa_attention

__all__ = ["ksa_attention"]
