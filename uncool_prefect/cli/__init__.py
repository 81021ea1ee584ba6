"""The ``uncool`` command.

    uncool run [-S key=value]       the project's pipeline ([tool.uncool] in pyproject.toml)
    uncool init DIR                 a new project: the issue-labeler example
    uncool status                   (see `uncool --help`)
    uncool predict|serve            use the champion of the project's model
    uncool lineage|checkout|reproduce|exp show|diff   find, recover and audit runs
    uncool deploy|worker|watch      deployments, a worker, the new-data watcher
    uncool store put|get|cat|ls|du|verify|gc
    uncool server start|stop|status
    uncool block register           save the store as a Prefect block
    uncool sample-data|demo

One module per command group; each registers its commands on ``common.app``.
Every store command takes ``--basepath URL`` (default: ``UNCOOL_STORE``, else
``.uncool/store`` in the project folder).
"""

from __future__ import annotations

import atexit
import sys

from ..store import StoreError
from . import automation, experiments, lineage, pipeline, server, store  # noqa: F401 - they register
from .common import app, err

__all__ = ["app", "main"]


def main() -> None:
    """Console entry point: store errors become one clear line and exit code 2."""
    # NOTE: registered first, so it runs last at exit, after Prefect's and
    # MLflow's flush handlers: the interpreter's final garbage collection over
    # their modules (and scikit-learn's) then has nothing to scan, saving ~1 s
    # per command. Python never promised to finalize objects left at exit.
    import gc as gc_module  # `gc` is the store command here

    atexit.register(gc_module.freeze)
    try:
        app()
    except StoreError as exc:
        err.print(f"error: {exc}", markup=False)
        sys.exit(2)
    except Exception as exc:
        if _is_user_error(exc):
            err.print(f"error: {exc}", markup=False)
            sys.exit(2)
        raise


def _is_user_error(exc: BaseException) -> bool:
    """Errors whose message already says what to do: no traceback for those."""
    from ..project.deploy import DeployError
    from ..project.runner import is_clear_error

    return is_clear_error(exc) or isinstance(exc, (LookupError, DeployError))


if __name__ == "__main__":
    main()
