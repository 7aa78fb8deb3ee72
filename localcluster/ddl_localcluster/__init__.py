"""Local development cluster: a real Kubernetes control plane on loopback (dev/test tool)."""
