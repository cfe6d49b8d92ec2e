"""Parametric memory: LoRA adapters as versioned cube content, resident in the model, and trained from items.

``adapters`` imports, exports and loads adapters; ``jobs`` runs memory training
in the background and commits its result.
"""
