"""The cluster room: what several memosd nodes share through one etcd cluster.

etcd holds the cluster's small, global, strongly consistent state; each node keeps the data of the cubes
it owns, as a single node does. One job a module:

  etcd.py        a small etcd v3 client over etcd's JSON gateway (HTTP, stdlib only): several endpoints
                 with failover, timeouts, typed results, txn, leases, watch; ``EtcdUnavailable`` when no
                 endpoint (or no quorum) answers
  membership.py  a node's registration under a lease kept alive by a daemon thread; the live members
  directory.py   the cube directory: cube -> owner at an epoch, names unique cluster-wide, moves as a CAS
  placement.py   where a new cube goes: rendezvous (highest random weight) hashing over the live members
  claims.py      the kernel's DirectoryPort: cubes claimed for this node at AllocCube / ImportCube, released
                 at FreeCube; CLUSTER_UNAVAILABLE when etcd has no quorum
  view.py        the directory and the member list as last seen (a watch-fed cache): what the router reads
  settings.py    the cluster config (memosd/config): the must-agree values checked at each node's start, the
                 cluster-wide settings (quotas) set by a CAS and applied by every node's watch
  node.py        the daemon as a member ([cluster] etcd set): checked at start, joined (the local cubes
                 reconciled with the directory), left at stop
  move.py        MoveCube: the owner's protocol (drain, freeze, export, send, CAS, settle, delete) and the
                 target's side (receive unserved, settle by the directory), recovery at join by the marks
  marks.py       a move's durable local marks (<data_dir>/moves/): which copy a crash left mid-move
  crash.py       MEMOSD_TEST_CRASH_AT: a test-only SIGKILL at a named step of a move

Nothing here imports grpc: the wire stays in syscalls/ (syscalls/router.py forwards calls to owners)
(docs/ARCHITECTURE.md, "Cluster").
"""
