"""Kernel unit tests: a real RocksDB store, a hash embedder and in-memory indexes (no model, no daemon)."""
