"""Interaction data: readers (polars), vocabularies, the ETL to per-user arrays, splits, truncation.

Import from the submodules (``ksa_rec.data.etl``, ``ksa_rec.data.split``, ...); this package module
imports nothing so that ``import ksa_rec.data.truncation`` stays cheap.
"""
