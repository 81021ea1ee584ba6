"""``uncool exp show`` and ``uncool diff``: compare runs, like ``dvc exp show`` / ``dvc exp diff``.

``diff`` is also ``uncool exp diff``. Unknown targets raise
:class:`~uncool_prefect.records.targets.TargetError` and unknown columns or durations
:class:`LookupError`: the main entry point prints those as one line (exit 2).
"""

from __future__ import annotations

from typing import Annotated

import cyclopts
from cyclopts import Parameter
from rich.console import Console, RenderableType

from ..records import exp_table, experiments
from ..settings import get_settings
from .common import Basepath, app, open_cli_store, out

exp_app = cyclopts.App(
    name="exp",
    help="Compare pipeline runs: config changes, data versions, metrics and the champion.",
)
app.command(exp_app)

JsonOutput = Annotated[bool, Parameter(name="--json", help="Print JSON instead of a table.")]
# Piped output is printed at the table's natural width, up to this many columns.
PIPED_MAX_WIDTH = 1000


def _print(renderable: RenderableType) -> None:
    # NOTE: piped (not a terminal), the table is printed at its natural width
    # instead of squeezing a dozen columns into 80.
    if not out.is_terminal:
        needed = out.measure(renderable, options=out.options.update_width(PIPED_MAX_WIDTH)).maximum
        if needed > out.width:
            wide = Console(file=out.file, width=needed, highlight=False, soft_wrap=True)
            wide.print(renderable)
            return
    out.print(renderable)


@exp_app.command
def show(
    *,
    baseline: Annotated[str | None, Parameter(
        help="Run to compare configs against: a flow run id, 'champion', models:/NAME/N, "
             "models:/NAME@alias or an object id. Default: the oldest run shown.")] = None,
    flow: Annotated[str | None, Parameter(
        help="Only runs of this flow (its name, as exp show prints it).")] = None,
    since: Annotated[str | None, Parameter(
        help="Only runs started since: a duration ago (30m, 2h, 1d, 1w) or an ISO date "
             "(UTC unless it has an offset).")] = None,
    sort: Annotated[str | None, Parameter(
        help="Sort by a column: run, started, flow, trigger, data, model, champion, a "
             "config key (train.C) or a metric (macro_f1, best first).")] = None,
    json_output: JsonOutput = False,
    basepath: Basepath = None,
) -> None:
    """One row per run: when, which flow and trigger, data version, config values that
    differ from the baseline, metrics, model version and the champion."""
    table = experiments.exp_rows(
        open_cli_store(basepath), get_settings().home, baseline=baseline, flow=flow,
        since=None if since is None else experiments.parse_since(since), sort=sort,
    )
    if json_output:
        print(experiments.to_json(table))
        return
    if not table.rows:
        _print("no runs recorded yet: run `uncool run` first")
        return
    # NOTE: one line a run, laid out in one pass, where the table fits the
    # terminal (or PIPED_MAX_WIDTH); narrower, it prints as rich's table,
    # whose rows wrap together.
    _print(exp_table.render_table_fast(table))


@exp_app.command(name="diff")
def diff(
    a: str,
    b: str,
    /,
    *,
    json_output: JsonOutput = False,
    basepath: Basepath = None,
) -> None:
    """What changed between two runs: config, metrics (with deltas), data, code, model.

    Parameters
    ----------
    a
        The older run: a flow run id, 'champion', models:/NAME/N, models:/NAME@alias
        or an object id it produced.
    b
        The newer run, named the same ways.
    """
    result = experiments.diff_runs(open_cli_store(basepath), get_settings().home, a, b)
    if json_output:
        print(experiments.diff_to_json(result))
        return
    _print(experiments.render_diff(result))


app.command(diff)
