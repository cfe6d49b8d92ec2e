"""The MemReader: conversation turns -> memory items (facts, preferences, events), each linked to the turns
it came from. The pure core is here (prompt, strict parsing, the support check, reconcile planning); the job
that runs it is parametric/jobs.py's, on the runtime worker."""
