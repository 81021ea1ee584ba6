"""``uncool lineage`` and ``uncool checkout``.

Errors are :class:`~uncool_prefect.lineage.TargetError` (a ``LookupError``) or
store errors, whose messages say what to do: ``main()`` prints them as one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from cyclopts import Parameter

from .common import Basepath, app, open_cli_store, out

TARGET_HELP = ("A flow run id, 'champion', models:/NAME/VERSION, models:/NAME@ALIAS, "
               "or an object id (dataset, split, model, metrics).")


@app.command
def lineage(
    target: Annotated[str, Parameter(help=TARGET_HELP)],
    /,
    *,
    json_output: Annotated[bool, Parameter(name="--json", help="Print the lineage as JSON.")] = False,
    basepath: Basepath = None,
) -> None:
    """Show where a result came from and what used it.

    Upstream: the run that produced it (flow, start time, trigger), its params
    and their hash, the data version, the code snapshot and git commit, the
    environment, and the chain of stage outputs leading to it. Downstream: the
    stages of any run that took it as input, the MLflow model versions of a
    model, and later runs that reused its outputs from the cache.
    """
    from ..records.lineage import lineage_tree, render_tree
    from ..settings import get_settings

    tree = lineage_tree(open_cli_store(basepath), target, get_settings().home)
    if json_output:
        out.print(json.dumps(tree, indent=1, default=str), markup=False)
        return
    out.print(render_tree(tree))


@app.command
def checkout(
    target: Annotated[str, Parameter(help=TARGET_HELP)],
    dest: Annotated[Path, Parameter(help="A new or empty folder to write the run into.")],
    /,
    *,
    basepath: Basepath = None,
) -> None:
    """Write the run behind TARGET into DEST, ready to read and re-run.

    DEST gets params.yaml, data/ (the run's input data; more inputs in
    inputs/), model.pkl and metrics.json if it registered a model, code/ (the
    pipeline's folder, pyproject.toml and uncool_prefect/ as they ran),
    environment.json, run.json, git.diff if the tree was dirty, and a RUN.md
    explaining each. Every file is verified against its hash; a non-empty
    DEST is refused.
    """
    from ..records.lineage import checkout as do_checkout
    from ..settings import get_settings

    written = do_checkout(open_cli_store(basepath), target, dest, get_settings().home)
    out.print(f"checked out run into {written}; read {written / 'RUN.md'}")
