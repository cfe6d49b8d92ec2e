"""Syscall semantics: cubes, mounts, revisions, search. No gRPC, no torch here."""
