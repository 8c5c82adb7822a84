"""Exact top-K over the whole item table for serving: the shared ranking walk of
:mod:`ksa_rec.models.ranking`, re-exported under the name the serving engine imports."""

from ksa_rec.models.ranking import topk_items

__all__ = ["topk_items"]
