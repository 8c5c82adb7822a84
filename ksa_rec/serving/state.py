"""A user's streaming state and its byte form (safetensors; no pickle).

Per user: how many events it has, the last event's time and item (for the order check and the
time-gap feature), the identities and timestamps of its newest applied events (to recognise replays,
``ksa_rec.serving.admission``), the representation after its newest event, the items it has seen (for
excluding them from recommendations), and per layer the K/V rows the layer's kind keeps (KSA.md
section 7; ``ksa_rec.ops.ksa.step``).

Blob layout: a safetensors file whose metadata holds ``format``, ``version``, ``model_id``,
``event_count``, ``last_timestamp``, ``last_item`` and ``layers``; tensors ``vector``, ``seen``,
``recent_ids``, ``recent_ts`` and ``l{i}.{name}`` for each tensor of layer i's cache (``k, v, idx, sk,
sv, sidx`` for attention layers, the memory tensors for mka/fastmka). Version 1 blobs (no replay window)
are refused: exactly-once needs the identities of what was applied.
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from ksa_rec.errors import StateError

STATE_FORMAT = "ksa_rec.user_state"
STATE_VERSION = 2


def _no_events() -> Tensor:
    return torch.zeros(0, dtype=torch.int64)


@dataclass
class UserState:
    event_count: int
    last_timestamp: int
    last_item: int
    vector: Tensor
    """``[dim]`` representation after the newest event (zeros before any event)."""
    seen: Tensor
    """int64 ``[u]`` sorted distinct item ids the user interacted with."""
    layers: list[dict[str, Tensor]]
    """Per layer, the tensors of that user's state (``state.user(b)`` of the layer's state type)."""
    recent_ids: Tensor = field(default_factory=_no_events)
    """int64 ``[r]`` identities of the newest applied events, oldest first (``admission.REPLAY_WINDOW``)."""
    recent_ts: Tensor = field(default_factory=_no_events)
    """int64 ``[r]`` their timestamps."""

    @classmethod
    def empty(cls, caches: list, dim: int, dtype: torch.dtype) -> "UserState":
        return cls(0, 0, 0, torch.zeros(dim, dtype=dtype), torch.zeros(0, dtype=torch.int64),
                   [cache.user(0) for cache in caches])

    @property
    def num_bytes(self) -> int:
        """Bytes of the attention state (the per-layer caches), without the seen-items set."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())

    def cast(self, dtype: torch.dtype) -> "UserState":
        """The same state with its float tensors (vector, cached K/V, memories) in ``dtype``; integer
        tensors (ids, indices, identities) untouched."""
        def convert(t: Tensor) -> Tensor:
            return t.to(dtype) if t.is_floating_point() else t

        return UserState(self.event_count, self.last_timestamp, self.last_item, convert(self.vector), self.seen,
                         [{k: convert(v) for k, v in layer.items()} for layer in self.layers],
                         self.recent_ids, self.recent_ts)

    def to_bytes(self, model_id: str) -> bytes:
        tensors = {"vector": self.vector, "seen": self.seen, "recent_ids": self.recent_ids,
                   "recent_ts": self.recent_ts}
        for i, layer in enumerate(self.layers):
            tensors.update({f"l{i}.{key}": value for key, value in layer.items()})
        tensors = {name: t if t.device.type == "cpu" and not t.requires_grad else t.detach().cpu()
                   for name, t in tensors.items()}
        meta = {"format": STATE_FORMAT, "version": str(STATE_VERSION), "model_id": model_id,
                "event_count": str(self.event_count), "last_timestamp": str(self.last_timestamp),
                "last_item": str(self.last_item), "layers": str(len(self.layers))}
        if sys.byteorder != "little" or any(t.dtype not in _ST_DTYPES for t in tensors.values()):
            # Clones: cached rows are slices of batch tensors, and safetensors refuses shared storage.
            return st_save({name: t.clone() for name, t in tensors.items()}, metadata=meta)
        return _safetensors_bytes(tensors, meta)

    @classmethod
    def from_bytes(cls, blob: bytes, model_id: str, user: str) -> "UserState":
        """Decode a blob; a corrupt blob or one built by another model is a one-line ``StateError``."""
        meta = _metadata(blob, user)
        if meta.get("format") == STATE_FORMAT and meta.get("version") == "1":
            raise StateError(f"user {user!r}: state is a v1 user state, without the event identities this "
                             "version needs for exactly-once; rebuild the store: stream the events again into "
                             "a new --state")
        if meta.get("format") != STATE_FORMAT or meta.get("version") != str(STATE_VERSION):
            raise StateError(f"user {user!r}: state is not a ksa_rec v{STATE_VERSION} user state "
                             f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
        if meta.get("model_id") != model_id:
            raise StateError(f"user {user!r}: state was built by model {meta.get('model_id')!r}, not by this "
                             f"checkpoint ({model_id}); use the checkpoint that built the store or a new store")
        try:
            tensors = st_load(blob)
            layers: list[dict[str, Tensor]] = [{} for _ in range(int(meta["layers"]))]
            for name, value in tensors.items():
                if name.startswith("l") and "." in name:
                    layer, key = name[1:].split(".", 1)
                    layers[int(layer)][key] = value
            state = cls(int(meta["event_count"]), int(meta["last_timestamp"]), int(meta["last_item"]),
                        tensors["vector"], tensors["seen"], layers, tensors["recent_ids"], tensors["recent_ts"])
        except (KeyError, ValueError, RuntimeError, SafetensorError) as err:
            raise StateError(f"user {user!r}: corrupt state blob ({str(err).splitlines()[0][:200]})") from None
        return state


_ST_DTYPES = {torch.int64: "I64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
"""The dtypes a state holds, by safetensors name; any other goes through ``safetensors.torch.save``."""


def _safetensors_bytes(tensors: dict[str, Tensor], meta: dict[str, str]) -> bytes:
    """The safetensors file of ``tensors`` (little-endian CPU tensors of ``_ST_DTYPES``), laid out as
    ``safetensors.torch.save`` lays it out (data by dtype size, largest first, then name; header padded
    with spaces to 8 bytes), which ``test_state_store`` checks. Written here because that function's
    checks (shared storage, contiguity) cost ~0.4 ms a state, more than a one-event model step's share;
    the metadata comes out in a fixed order (``save`` orders it at random)."""
    header: dict[str, object] = {"__metadata__": meta}
    chunks, offset = [], 0
    for name in sorted(tensors, key=lambda n: (-tensors[n].element_size(), n)):
        t = tensors[name]
        if t.dtype == torch.bfloat16:  # numpy has no bf16: its bytes through a uint8 view
            # (an empty tensor may have stride 0, from ``torch.from_numpy`` of an empty array: view refuses it)
            data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        else:  # numpy writes C order whatever the strides
            data = t.numpy().tobytes()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def _metadata(blob: bytes, user: str) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` (8-byte little-endian length, then JSON)."""
    try:
        (length,) = struct.unpack("<Q", blob[:8])
        if length > len(blob) - 8:
            raise ValueError("header longer than the blob")
        header = json.loads(blob[8:8 + length])
        return dict(header.get("__metadata__") or {})
    except (struct.error, ValueError, UnicodeDecodeError, AttributeError) as err:
        raise StateError(f"user {user!r}: corrupt state blob ({err})") from None
