"""Serving: per-user streaming state, the state store, and the ``stream`` and ``score`` jobs."""
