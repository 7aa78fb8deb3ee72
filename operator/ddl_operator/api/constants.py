"""Names shared by the operator, the worker agent, the chart and the tests."""

from typing import Final

GROUP: Final = "ddl-operator.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "DDLJob"
PLURAL: Final = "ddljobs"
SINGULAR: Final = "ddljob"
SHORT_NAMES: Final = ("ddlj",)
CATEGORIES: Final = ("ddl",)
CRD_NAME: Final = f"{PLURAL}.{GROUP}"

GPU_RESOURCE: Final = "nvidia.com/gpu"

# Topology labels. The node, rack and zone labels are Kubernetes' well-known ones where they
# exist; the NVLink domain has none, so it lives under our group.
LABEL_HOSTNAME: Final = "kubernetes.io/hostname"
LABEL_NVLINK_DOMAIN: Final = f"{GROUP}/nvlink-domain"
LABEL_RACK: Final = "topology.kubernetes.io/rack"
LABEL_ZONE: Final = "topology.kubernetes.io/zone"
DEFAULT_TOPOLOGY_LEVELS: Final = (LABEL_HOSTNAME, LABEL_NVLINK_DOMAIN, LABEL_RACK, LABEL_ZONE)

# spec.managedBy of the jobs this operator reconciles (unset means the same). Any other value
# hands the job to that controller (MultiKueue's, a test harness): the operator leaves it alone.
CONTROLLER_NAME: Final = f"{GROUP}/ddljob-controller"

# Labels and annotations the operator puts on the children it makes.
LABEL_JOB: Final = f"{GROUP}/job"
LABEL_RANK: Final = f"{GROUP}/rank"
LABEL_ROLE: Final = f"{GROUP}/role"
SCHEDULING_GATE: Final = f"{GROUP}/placement"
# The agent reports its state (JSON) on its own pod; the operator folds it into the job status.
ANNOTATION_REPORT: Final = f"{GROUP}/report"

# Exit code a training process uses to say "a retry cannot help" (bad config, bad data).
EXIT_CODE_PERMANENT: Final = 42
