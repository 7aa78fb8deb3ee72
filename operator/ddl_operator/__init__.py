"""ddl-operator: a Kubernetes operator for elastic distributed deep-learning jobs."""

from typing import Final

__version__: Final = "0.1.0"
