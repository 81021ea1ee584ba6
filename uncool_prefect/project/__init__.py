"""A project: its [tool.uncool] config and params, `uncool run`, the server, deployments, init."""
