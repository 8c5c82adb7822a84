"""KSA attention (placeholder dispatcher; the reference backend lands with the KSA op)."""

from ksa_rec.ops.ksa.dense import ksa_dense as ksa_attention  # noqa: F401  (temporary)
