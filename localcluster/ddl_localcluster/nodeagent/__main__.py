"""`python -m ddl_localcluster.nodeagent`: the node agent's command line (see cli.py)."""

import sys

from ddl_localcluster.nodeagent.cli import main

sys.exit(main())
