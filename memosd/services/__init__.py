"""Use cases that span subsystems, in plain values (no grpc, no protobuf).

Each service takes the parts it touches (kernel, access control, activator, adapter service, usage
tracker, ...) in its constructor and owns one invariant that no single part can keep alone:

    cubes.py      CubeRemoval: FreeCube; nothing of a freed cube outlives it, in any part
    erasure.py    Erasure: Purge and the lifecycle loop's purge; no copy of a purged item survives
    lifecycle.py  LifecycleLoop: TTL expiry, purge after the grace, compaction, audited by the loop itself
    stats.py      StatsService: the Stats value (the daemon's counters), read from every part

Only ``syscalls/`` (which converts to and from messages) and ``daemon.py`` (which wires them) import
this package; the parts below (kernel/, activation/, parametric/, governance/) never do.
"""
