"""The encoder's typed configuration (mirrored by ``model.encoder`` in the YAML files of configs/).

Validated on construction, so a bad YAML value fails at parse time with a message that names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ksa_rec.modules.attention import KINDS
from ksa_rec.modules.hstu import HstuConfig
from ksa_rec.modules.mka import MkaConfig
from ksa_rec.utils.config import require


def parse_pattern(pattern: str) -> list[str]:
    """``"ksa*3,full"`` -> ``["ksa", "ksa", "ksa", "full"]``; one kind per layer, ``kind*N`` repeats."""
    layers: list[str] = []
    for token in (t.strip() for t in pattern.split(",")):
        kind, _, times = token.partition("*")
        kind = kind.strip()
        if kind not in KINDS:
            raise ValueError(f"pattern {pattern!r}: unknown attention kind {kind!r}; known: {', '.join(KINDS)}")
        if times and (not times.strip().isdigit() or int(times) < 1):
            raise ValueError(f"pattern {pattern!r}: repeat count in {token!r} must be a positive integer")
        layers.extend([kind] * (int(times) if times else 1))
    return layers


@dataclass
class EncoderConfig:
    """Sequence encoder: pre-norm blocks whose attention kind is chosen per layer by ``pattern``."""

    dim: int = 64
    """Width of event states and of every embedding table."""
    num_heads: int = 2
    """Attention heads per layer (``dim / num_heads`` must be even: RoPE rotates pairs)."""
    pattern: str = "full,full"
    """Attention kind per layer, comma-separated, ``kind*N`` repeats: full, ksa, sca, swa, mka, fastmka, hstu."""
    ffn_mult: int = 4
    """Hidden width of each feed-forward block, as a multiple of dim."""
    ffn_activation: str = "gelu"
    """Feed-forward block: "gelu" (Linear, GELU, Linear) or "swiglu" (a SiLU-gated linear unit of the same hidden
    width, as LiGR layers and most recent LLMs use)."""
    residual_gates: bool = False
    """Scale each block's attention and feed-forward output by ``sigmoid(W h + b)`` of the stream it is added to,
    per channel, before the residual add (the gated residuals of LiGR layers, which eSASRec uses). A token's gates
    depend on that token only, so training, streaming and scoring compute them alike."""
    dropout: float = 0.2
    """Dropout on inputs, attention outputs and feed-forward outputs."""
    event_mask: float = 0.0
    """Training only: probability that an event's whole input token is zeroed (item masking, a cheap sequence
    augmentation: the event keeps its position and its target, the model loses what it was). 0 disables."""
    chunk_size: int = 8
    """KSA/SCA chunk size k (events per chunk); histories are truncated at multiples of it."""
    window: int = 32
    """Window in chunks for ksa/sca layers; swa layers see ``window * chunk_size`` previous events."""
    summary_tokens: int = 1
    """Summary tokens S per complete chunk (must divide chunk_size)."""
    max_summaries: int | None = None
    """Most old summaries an event sees (oldest dropped); None keeps all."""
    summary_init: str = "slot"
    """A summary's first-layer input: "slot" (its learned slot embedding, as the KSA paper) or "chunk" (also a
    learned map of the mean of its chunk slice's event inputs, so first-layer summaries carry content). Like
    window, unused by patterns without a ksa layer."""
    summary_qkv: str = "own"
    """How a layer projects the summary stream to queries, keys and values: "own" (a Q/K/V projection of its
    own, as the KSA paper), "shared" (the events' projection) or "delta" (the events' projection plus a
    summary-only correction that starts at zero). Shared puts summary keys in the event keys' space, so one
    lookup serves raw events in the window and summaries beyond it, trained by targets at every distance; delta
    starts there and may move away. Under both, ``summary_init: chunk``'s pooling map starts as the identity (a
    summary's first input starts as its slot plus its chunk's mean input)."""
    rope_base: float = 10000.0
    """Base of the rotary position embedding's frequencies."""
    time_gap_buckets: int = 0
    """> 0 adds an embedding of log2 time gaps to the previous event (0 disables)."""
    attention_backend: str | None = None
    """Attention backend for training, streaming and scoring: null (auto), torch, flex or triton."""
    norm_backend: str | None = None
    """RMSNorm backend (``ksa_rec.ops.norm``): null (auto: the fused Triton kernel on CUDA, torch elsewhere), torch
    or triton. The residual add before each block's second norm runs in the same kernel."""
    cuda_graphs: bool = False
    """Training on CUDA: replay the encoder's forward and backward from CUDA graphs for batch layouts that repeat
    (captured the second time a layout is seen; ``ksa_rec.modules.graphs``). Pays where the step is bound by
    kernel launches (small dims) and batches repeat their layout (fixed-length windows, uniform batches).
    Evaluation, serving and the CPU always run eagerly."""
    mka: MkaConfig = field(default_factory=MkaConfig)
    """Settings of mka / fastmka layers (MKA.md)."""
    hstu: HstuConfig = field(default_factory=HstuConfig)
    """Settings of hstu layers (``ksa_rec.modules.hstu``)."""

    def __post_init__(self) -> None:
        layers = parse_pattern(self.pattern)
        if isinstance(self.mka, dict):
            self.mka = MkaConfig(**self.mka)
        if isinstance(self.hstu, dict):
            self.hstu = HstuConfig(**self.hstu)
        kinds = [KINDS[k] for k in layers]
        readers = sorted({k.kind for k in kinds if k.reads_summaries})
        blockers = sorted({k.kind for k in kinds if not k.carries_summaries})
        require(not (readers and blockers), "encoder.pattern",
                f"{'/'.join(blockers)} layers cannot share a pattern with {'/'.join(readers)} layers (they carry "
                "no summary stream)")
        require(self.dim > 0 and self.num_heads > 0 and self.dim % self.num_heads == 0,
                "encoder.dim", f"must be a positive multiple of num_heads ({self.num_heads}), got {self.dim}")
        require((self.dim // self.num_heads) % 2 == 0, "encoder.dim",
                "dim / num_heads must be even (RoPE rotates pairs)")
        require(self.ffn_activation in ("gelu", "swiglu"), "encoder.ffn_activation",
                f"must be gelu or swiglu, got {self.ffn_activation!r}")
        require(0.0 <= self.dropout < 1.0, "encoder.dropout", f"must be in [0, 1), got {self.dropout}")
        require(0.0 <= self.event_mask < 1.0, "encoder.event_mask", f"must be in [0, 1), got {self.event_mask}")
        require(self.chunk_size >= 1, "encoder.chunk_size", f"must be >= 1, got {self.chunk_size}")
        require(self.window >= 0, "encoder.window", f"must be >= 0, got {self.window}")
        require(self.summary_tokens >= 1 and self.chunk_size % self.summary_tokens == 0,
                "encoder.summary_tokens", f"must be >= 1 and divide chunk_size ({self.chunk_size})")
        require(self.max_summaries is None or self.max_summaries >= 0, "encoder.max_summaries", "must be None or >= 0")
        require(self.summary_init in ("slot", "chunk"), "encoder.summary_init",
                f"must be slot or chunk, got {self.summary_init!r}")
        require(self.summary_qkv in ("own", "shared", "delta"), "encoder.summary_qkv",
                f"must be own, shared or delta, got {self.summary_qkv!r}")
        require(self.time_gap_buckets >= 0, "encoder.time_gap_buckets", "must be >= 0")
        require(self.attention_backend in (None, "torch", "flex", "triton"), "encoder.attention_backend",
                f"must be null, torch, flex or triton, got {self.attention_backend!r}")
        require(self.norm_backend in (None, "torch", "triton"), "encoder.norm_backend",
                f"must be null, torch or triton, got {self.norm_backend!r}")

    @property
    def layers(self) -> list[str]:
        return parse_pattern(self.pattern)

    @property
    def uses_summaries(self) -> bool:
        """Whether the encoder carries a summary stream (some layer's events read summaries)."""
        return any(KINDS[k].reads_summaries for k in self.layers)
