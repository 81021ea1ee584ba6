"""``uncool server`` and ``uncool block``: a local Prefect server, the store as a block."""

from __future__ import annotations

import cyclopts

from ..settings import get_settings
from .common import Basepath, app, out

server_app = cyclopts.App(name="server", help="A local Prefect server in the background.")
block_app = cyclopts.App(name="block", help="The store as a Prefect block.")
app.command(server_app)
app.command(block_app)


@server_app.command(name="start")
def server_start(*, port: int | None = None) -> None:
    """Start a Prefect server on 127.0.0.1 in the background (pid/log in .uncool/server)."""
    from ..project import server

    info = server.start(get_settings().home, port=port)
    out.print(f"Prefect server up: {info.ui_url} (pid {info.pid}, log {info.log})")
    out.print(f"use it with: export PREFECT_API_URL={info.api_url}")


@server_app.command(name="stop")
def server_stop() -> None:
    """Stop the server started by `uncool server start`."""
    from ..project import server

    stopped = server.stop(get_settings().home)
    out.print("stopped" if stopped else "no server of ours was running")


@server_app.command(name="status")
def server_status() -> int:
    """Say whether our background server is up, or which server answers instead (exit 1: none)."""
    from ..project import server

    info = server.status(get_settings().home)
    if info is None:
        # The same order as server.ensure: the environment, Prefect's profile, then :4200.
        other = server.configured_api_url() or server.LOCAL_API_URL
        if server.is_healthy(other):
            out.print(f"not started by this project; uncool commands use the server that "
                      f"answers at {other.removesuffix('/api')}")
            return 0
        out.print("not running")
        return 1
    out.print(f"running: {info.ui_url} (pid {info.pid}, log {info.log})")
    return 0


# -- block -----------------------------------------------------------------
@block_app.command(name="register")
def block_register(name: str | None = None, /, *, basepath: Basepath = None) -> None:
    """Save a ContentAddressedStorage block NAME for the store (needs a Prefect API).

    NAME defaults to the store's own block, the one `uncool run` and the
    deployments use (UNCOOL_BLOCK, else uncool-<hash of the store URL>).
    """
    from ..blocks import ContentAddressedStorage
    from .automation import prefect_at, server_api_url

    settings = get_settings(store=basepath) if basepath else get_settings()
    url = basepath or settings.store_url
    name = name or settings.block
    api_url = server_api_url()  # the server `uncool run` uses, not a temporary one
    with prefect_at(api_url):
        ContentAddressedStorage.register_type_and_schema()
        ContentAddressedStorage(basepath=url).save(name, overwrite=True)
    out.print(f"saved block content-addressed-storage/{name} -> {url} on {api_url}")


