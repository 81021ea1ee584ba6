"""`python -m uncool_prefect.cli`: the `uncool` command."""

from . import main

main()
