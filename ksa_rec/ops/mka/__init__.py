"""Memory-Keyed Attention (MKA) and FastMKA ops (MKA.md; the math is in this folder's README).

* ``reference`` -- the parallel torch paths used for training: L1 windowed attention (blockwise SWA op),
  L2 normalised EMAs by a chunked scan, L3 block-mean bank by segment sums and tiled attention, and
  FastMKA's fused sources.
* ``streaming`` -- the step path: a piece of new events per user against fixed-size per-user state.
* ``recurrence`` -- plain per-user, per-event loops: the oracle both are tested against.

The layers that use them are ``ksa_rec.modules.mka.MkaAttention`` and ``FastMkaAttention``.
"""

from ksa_rec.ops.mka.reference import (
    LEVELS,
    bank_attention,
    ema_scan,
    fastmka_sources,
    level_weights,
    local_attention,
    mix_levels,
    mka_session,
)

__all__ = [
    "LEVELS", "bank_attention", "ema_scan", "fastmka_sources", "level_weights", "local_attention", "mix_levels",
    "mka_session",
]
