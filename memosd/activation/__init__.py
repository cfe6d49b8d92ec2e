"""Activation memory: cubes' memory blocks as KV caches (Activate, Evict) and Generate over them.

``host`` owns the model, its worker thread and the KV pool; ``render`` turns
items into tokens; ``activator`` makes, pools and persists caches;
``generator`` builds prompts and streams replies; ``decode`` samples and
detokenizes.
"""
