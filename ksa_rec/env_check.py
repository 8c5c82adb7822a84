"""Check that torch, fbgemm-gpu and torchrec form a working set; run ``python -m ksa_rec.env_check``.

The check builds a tiny EmbeddingCollection and looks up one KeyedJaggedTensor, which is exactly what
fails when fbgemm-gpu does not match torch (its ops fail to load).
"""

from __future__ import annotations

import sys


def main() -> int:
    import torch
    try:
        import fbgemm_gpu  # noqa: F401
        import torchrec
        from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
    except Exception as exc:  # report any import failure of the set in one line
        print(f"env_check: torchrec/fbgemm-gpu do not load with torch {torch.__version__}: {exc}")
        return 1
    table = EmbeddingConfig(name="t", embedding_dim=4, num_embeddings=8, feature_names=["f"])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.tensor([1, 2, 3]),
                                              lengths=torch.tensor([2, 1]))
    out = EmbeddingCollection(tables=[table])(kjt)["f"].values()
    assert out.shape == (3, 4)
    print(f"env_check: torch {torch.__version__}, torchrec {torchrec.__version__}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
