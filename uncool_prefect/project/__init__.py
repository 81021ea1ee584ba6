"""A project: its [tool.uncool] config and params, `uncool run`, the server, deployments, init."""

# The work pool `uncool deploy` and `uncool worker` use, and how often the worker
# polls for runs to start (Prefect's default: 10 s). Here, not in deploy.py, so
# that the CLI's defaults need no import of the deployment code.
POOL = "uncool-local"
WORKER_QUERY_SECONDS = 0.5
