"""uncool-prefect: versioned, cached, recorded ML pipelines on Prefect.

The public API::

    from uncool_prefect import stage, pipeline, register_model, Gate

- ``@stage``: a Prefect task cached by content and stored by hash (:mod:`.api`);
- ``@pipeline``: a Prefect flow whose every run writes a run record (:mod:`.api`);
- ``register_model(model, name, metrics, gate=Gate(...))``: MLflow registry and
  the champion gate (:mod:`.tracking`);
- ``get_store()``: the project's object store, for files and folders in stages;
- ``ContentAddressedStorage`` (the Prefect block) and ``ContentAware`` (the
  cache policy) for plain ``@task`` s and ``@flow`` s.

Names are imported lazily, so that ``uncool_prefect.store`` stays usable, and
fast to import, without Prefect.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import get_store, pipeline, replayed_input, stage
    from .blocks import ContentAddressedStorage
    from .caching import ContentAware
    from .tracking import Gate, Registration, register_model

_EXPORTS = {
    "stage": ".api", "pipeline": ".api", "get_store": ".api", "replayed_input": ".api",
    "register_model": ".tracking", "Gate": ".tracking", "Registration": ".tracking",
    "ContentAddressedStorage": ".blocks", "ContentAware": ".caching",
}

__all__ = ["ContentAddressedStorage", "ContentAware", "Gate", "Registration", "__version__",
           "get_store", "pipeline", "register_model", "replayed_input", "stage"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'uncool_prefect' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
