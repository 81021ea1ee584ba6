"""uncool-prefect: content-addressed, verified storage and caching for Prefect.

``ContentAddressedStorage`` (the Prefect block) is imported lazily so that
``uncool_prefect.store`` stays usable, and fast to import, without Prefect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .blocks import ContentAddressedStorage

__all__ = ["ContentAddressedStorage", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "ContentAddressedStorage":
        from .blocks import ContentAddressedStorage

        return ContentAddressedStorage
    raise AttributeError(f"module 'uncool_prefect' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "ContentAddressedStorage"])
