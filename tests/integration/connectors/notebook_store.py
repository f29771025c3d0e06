"""A product store the pipeline has never seen: "Allego Notebook", people and their
notes kept in one JSON file. It reaches the pipeline only through an entry point and a
stores TOML, as a product team's package would (see test_new_store_by_entry_point)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from connectors.base import (
    Correction,
    CorrectionResult,
    DataFacts,
    ErasureResult,
    Identity,
    MappingError,
    OptOutResult,
)
from connectors.memory import MemoryConnector


class NotebookConnector(MemoryConnector):
    """The reference connector's logic over a JSON file, written after every change."""

    def __init__(self, name: str, path: Path, **kwargs: Any) -> None:
        data = json.loads(path.read_text(encoding="utf-8"))
        super().__init__(name, data["people"], data["records"], **kwargs)
        self.path = path

    @classmethod
    def from_config(  # type: ignore[override]
        cls, name: str, settings: Mapping[str, Any], data_dir: Path
    ) -> NotebookConnector:
        path = Path(settings["path"])
        if not path.is_file():
            raise MappingError(f"store {name!r}: notebook file {path} does not exist")
        facts = {
            collection: DataFacts(
                purpose=raw["purpose"],
                categories=tuple(raw["categories"]),
                recipients=tuple(raw["recipients"]),
                retention=raw["retention"],
                source=raw["source"],
            )
            for collection, raw in settings["facts"].items()
        }
        retain = {k: (v["legal_basis"], v["period"]) for k, v in settings.get("retain", {}).items()}
        return cls(
            name,
            path,
            title=settings["title"],
            description=settings.get("description", ""),
            facts=facts,
            retain=retain,
        )

    def _save(self) -> None:
        data = {"people": self.people, "records": self.records}
        self.path.write_text(json.dumps(data, indent=1), encoding="utf-8")

    def correct(self, identity: Identity, corrections: tuple[Correction, ...]) -> CorrectionResult:
        result = super().correct(identity, corrections)
        self._save()
        return result

    def erase(self, identity: Identity) -> ErasureResult:
        result = super().erase(identity)
        self._save()
        return result

    def opt_out(self, identity: Identity) -> OptOutResult:
        result = super().opt_out(identity)
        self._save()
        return result
