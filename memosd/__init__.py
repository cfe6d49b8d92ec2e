"""memosd: a memory operating system for language models."""

__version__ = "0.1.0"
