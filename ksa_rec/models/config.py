"""Typed model configuration: the single source of truth, mirrored by the YAML files in configs/.

Every dataclass validates itself on construction, so a bad YAML value fails at parse time with a
message that names the field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from ksa_rec.modules.mka import MkaConfig

ATTENTION_KINDS = ("full", "ksa", "sca", "swa", "mka", "fastmka")
"""Layer kinds the encoder accepts in its pattern (KSA.md section 10, MKA.md)."""
MEMORY_KINDS = ("mka", "fastmka")

T = TypeVar("T")


def parse_pattern(pattern: str) -> list[str]:
    """``"ksa*3,full"`` -> ``["ksa", "ksa", "ksa", "full"]``; one kind per layer, ``kind*N`` repeats."""
    layers: list[str] = []
    for token in (t.strip() for t in pattern.split(",")):
        kind, _, times = token.partition("*")
        kind = kind.strip()
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"pattern {pattern!r}: unknown attention kind {kind!r}; "
                             f"known: {', '.join(ATTENTION_KINDS)}")
        if times and (not times.strip().isdigit() or int(times) < 1):
            raise ValueError(f"pattern {pattern!r}: repeat count in {token!r} must be a positive integer")
        layers.extend([kind] * (int(times) if times else 1))
    return layers


@dataclass
class EncoderConfig:
    """Sequence encoder: pre-norm blocks whose attention kind is chosen per layer by ``pattern``."""

    dim: int = 64
    num_heads: int = 2
    pattern: str = "full,full"
    ffn_mult: int = 4
    dropout: float = 0.2
    chunk_size: int = 8
    """KSA/SCA chunk size k (events per chunk); histories are truncated at multiples of it."""
    window: int = 32
    """Window in chunks for ksa/sca layers; swa layers see ``window * chunk_size`` previous events."""
    summary_tokens: int = 1
    max_summaries: int | None = None
    """Most old summaries an event sees (oldest dropped); None keeps all."""
    rope_base: float = 10000.0
    time_gap_buckets: int = 0
    """> 0 adds an embedding of log2 time gaps to the previous event (0 disables)."""
    attention_backend: str | None = None
    """KSA op backend: None (auto), "torch", "flex" or "triton"."""
    mka: MkaConfig = field(default_factory=MkaConfig)
    """Settings of mka / fastmka layers (MKA.md)."""

    def __post_init__(self) -> None:
        layers = parse_pattern(self.pattern)
        if isinstance(self.mka, dict):
            self.mka = MkaConfig(**self.mka)
        _require(not ("ksa" in layers and any(k in MEMORY_KINDS for k in layers)), "encoder.pattern",
                 "mka/fastmka layers cannot share a pattern with ksa layers (they carry no summary stream)")
        _require(self.dim > 0 and self.num_heads > 0 and self.dim % self.num_heads == 0,
                 "encoder.dim", f"must be a positive multiple of num_heads ({self.num_heads}), got {self.dim}")
        _require((self.dim // self.num_heads) % 2 == 0, "encoder.dim",
                 "dim / num_heads must be even (RoPE rotates pairs)")
        _require(0.0 <= self.dropout < 1.0, "encoder.dropout", f"must be in [0, 1), got {self.dropout}")
        _require(self.chunk_size >= 1, "encoder.chunk_size", f"must be >= 1, got {self.chunk_size}")
        _require(self.window >= 0, "encoder.window", f"must be >= 0, got {self.window}")
        _require(self.summary_tokens >= 1 and self.chunk_size % self.summary_tokens == 0,
                 "encoder.summary_tokens", f"must be >= 1 and divide chunk_size ({self.chunk_size})")
        _require(self.max_summaries is None or self.max_summaries >= 0, "encoder.max_summaries",
                 "must be None or >= 0")
        _require(self.time_gap_buckets >= 0, "encoder.time_gap_buckets", "must be >= 0")
        _require(self.attention_backend in (None, "torch", "flex", "triton"), "encoder.attention_backend",
                 f"must be null, torch, flex or triton, got {self.attention_backend!r}")

    @property
    def layers(self) -> list[str]:
        return parse_pattern(self.pattern)

    @property
    def uses_summaries(self) -> bool:
        return "ksa" in self.layers


@dataclass
class LossConfig:
    """Next-item loss: full softmax cross-entropy, or sampled softmax with in-batch + uniform negatives."""

    kind: str = "ce"
    """"ce" (full catalogue) or "sampled"."""
    num_uniform_negatives: int = 256
    in_batch_negatives: bool = True
    logq_correction: bool = True
    temperature: float = 1.0
    summary_reconstruction: float = 0.0
    """Weight of an auxiliary loss asking every summary state that a later KSA layer reads to name the
    items of its chunk slice (softmax over the catalogue); 0 = off. Needs a ksa layer after the first."""

    def __post_init__(self) -> None:
        _require(self.kind in ("ce", "sampled"), "loss.kind", f"must be 'ce' or 'sampled', got {self.kind!r}")
        _require(self.summary_reconstruction >= 0, "loss.summary_reconstruction", "must be >= 0")
        _require(self.num_uniform_negatives >= 0, "loss.num_uniform_negatives", "must be >= 0")
        _require(self.temperature > 0, "loss.temperature", "must be > 0")
        _require(self.kind == "ce" or self.in_batch_negatives or self.num_uniform_negatives > 0,
                 "loss", "sampled softmax needs in-batch or uniform negatives")


@dataclass
class DataSpec:
    """What the model needs to know about the data: table sizes (ids 0 and 1 are PAD and OOV)."""

    num_items: int
    feature_cardinalities: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(self.num_items >= 3, "data_spec.num_items", f"needs at least one real item, got {self.num_items}")


def _require(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {problem}")


def coerce(cls: type[T], value: Any) -> T:
    """Accept a dataclass instance or its ``asdict`` form (how configs come back from checkpoints)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}")
        return cls(**value)
    raise TypeError(f"expected {cls.__name__} or dict, got {type(value).__name__}")


def to_dict(value: Any) -> dict:
    return asdict(value)
