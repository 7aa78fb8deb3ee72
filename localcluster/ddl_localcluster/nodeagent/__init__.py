"""The local node agent: a kubelet stand-in that runs the local cluster's pods as processes.

Modules, one concern each:

    api            HTTP client of the API server (kubeconfig identity, calls, watches)
    containerspec  a container's env ($(VAR), fieldRefs, env sources), argv, hostname, hosts
    lifecycle      a pod's life as data: next step, exit and restart back-off, its status
    identity       the pod's service-account token and KUBECONFIG
    processes      pid records, process-group signals, cleanup after a crash
    pods           the pod workers: processes, network, API writes, `kubectl logs`
    podwatch       the cache of bound pods (list, then watch)
    heartbeat      node registration, Ready status posts, Lease renewals
    slowdown       a slowed node's duty cycle as data (the knob, run and frozen phases)
    throttle       per-node cgroups (or process-group signals) frozen on that duty cycle
    control        the control socket (node-down/up/delete/slow, status) and send()
    agent          the run loop that wires them together
    cli            `python -m ddl_localcluster.nodeagent ...`
"""

from ddl_localcluster.nodeagent.agent import NodeAgent, run_agent
from ddl_localcluster.nodeagent.api import ApiError, KubeApi
from ddl_localcluster.nodeagent.cli import default_state_dir, main
from ddl_localcluster.nodeagent.containerspec import ConfigError
from ddl_localcluster.nodeagent.control import SOCKET_NAME, Command, send
from ddl_localcluster.nodeagent.heartbeat import NodeState
from ddl_localcluster.nodeagent.lifecycle import PodRun
from ddl_localcluster.nodeagent.processes import cleanup

__all__ = [
    "SOCKET_NAME",
    "ApiError",
    "Command",
    "ConfigError",
    "KubeApi",
    "NodeAgent",
    "NodeState",
    "PodRun",
    "cleanup",
    "default_state_dir",
    "main",
    "run_agent",
    "send",
]
