"""Connectors: how the pipeline reaches each product store.

`connectors.base` is the contract; `connectors.registry.load_connectors` builds the
configured stores; `sql`, `files`, `http` and `memory` are the generic connectors;
`testing` is the conformance kit; `allego`
holds the Allego product stores' mappings and the demo data generator.
"""

from connectors.base import (
    Capability,
    Connector,
    ConnectorError,
    Identity,
    InvalidCorrection,
    MappingError,
    StoreUnavailable,
    UnsupportedAction,
)
from connectors.registry import close_all, load_connectors

__all__ = [
    "Capability",
    "Connector",
    "ConnectorError",
    "Identity",
    "InvalidCorrection",
    "MappingError",
    "StoreUnavailable",
    "UnsupportedAction",
    "close_all",
    "load_connectors",
]
