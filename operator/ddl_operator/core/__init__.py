"""The operator's pure core: decisions made on in-memory snapshots, no Kubernetes I/O."""
