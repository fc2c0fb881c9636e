"""Reading Hugging Face `datasets` layouts (parquet / arrow folders, `save_to_disk`, hub ids) lazily.

Sources built on this read the text columns eagerly and leave images encoded in the memory-mapped
Arrow table: each Sample's image is a `DatasetImage` that decodes its row on use.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vlmkit.data.images import LazyImage
from vlmkit.errors import DataError

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# A split's other common names in published layouts.
SPLIT_ALIASES = {
    "val": ("validation", "val"),
    "validation": ("validation", "val"),
    "dev": ("validation", "val", "dev"),
}


class DatasetImage(LazyImage):
    """Row `index` of a `datasets.Dataset`'s image column, decoded on use (the table is memory-mapped)."""

    def __init__(self, table: Any, index: int, column: str, key: str) -> None:
        self.table = table
        self.index = index
        self.column = column
        self.key = key

    def read(self) -> Any:
        value = self.table[self.index][self.column]
        if isinstance(value, dict):  # datasets' Image(decode=False): {"bytes": ..., "path": ...}
            if value.get("bytes"):
                return value["bytes"]
            if value.get("path"):
                return value["path"]
            raise DataError(f"image {self.key} has neither bytes nor a path")
        return value  # PIL image, bytes or path


def split_names(split: str) -> tuple[str, ...]:
    return SPLIT_ALIASES.get(split, (split,))


def local_files(root: Path, split: str, extension: str, subset: str | None = None) -> list[str]:
    """Files of one split in the usual layouts: `{split}-*.ext`, `data/{split}-*.ext`, `{split}/*.ext`."""
    for name in split_names(split):
        patterns = [
            f"{name}.{extension}",
            f"{name}-*.{extension}",
            f"data/{name}-*.{extension}",
            f"data/{name}.{extension}",
            f"{name}/*.{extension}",
            f"data/{name}/*.{extension}",
            f"*/{name}-*.{extension}",  # a subset per folder (lmms-lab/DocVQA: DocVQA/, InfographicVQA/)
            f"*/{name}/*.{extension}",  # the hub's refs/convert/parquet: default/{split}/0000.parquet
        ]
        for pattern in patterns:
            files = sorted(str(p) for p in root.glob(pattern))
            if files:
                return _one_subset(root, files, subset)
    return []


def _one_subset(root: Path, files: list[str], subset: str | None) -> list[str]:
    """Files of one subset folder: `subset` if it is one of them, else the only one there is."""
    parts = [Path(f).relative_to(root).parts for f in files]
    folders = sorted({p[0] for p in parts})
    if any(len(p) < 2 for p in parts) or len(folders) == 1:
        return files
    if subset in folders:
        return [f for f in files if Path(f).relative_to(root).parts[0] == subset]
    raise DataError(
        f"{root} holds several subsets side by side ({', '.join(folders)}); point data.path at one "
        f"of them, e.g. {root / folders[0]}"
    )


def open_table(
    source: str, path: str | None, split: str, default_hub_id: str, subset: str | None = None
) -> Any:
    """A `datasets.Dataset` for one split, from a local folder or (online) a hub id.

    `subset`: the folder to read when a snapshot holds several side by side (lmms-lab/DocVQA).
    """
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is in the train extra
        raise DataError(
            f"the {source} source needs the datasets package: pip install 'vlmkit[train]'"
        ) from None
    location = path or default_hub_id
    root = Path(location)
    if root.is_dir():
        if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
            loaded = datasets.load_from_disk(str(root))
            if isinstance(loaded, datasets.DatasetDict):
                for name in split_names(split):
                    if name in loaded:
                        return loaded[name]
                raise DataError(f"{source} at {root} has splits {', '.join(loaded)}, not {split!r}")
            saved = str(loaded.split) if loaded.split is not None else None
            if saved is None:
                logger.warning("%s: %s holds one unnamed split; reading it as %r", source, root, split)
            elif saved not in split_names(split):
                raise DataError(
                    f"{source}: {root} is a save_to_disk folder of the {saved!r} split only, not {split!r}; "
                    f"use split {saved} or point data.path at the {split} folder"
                )
            return loaded
        for extension, builder in (("parquet", "parquet"), ("arrow", "arrow")):
            files = local_files(root, split, extension, subset)
            if files:
                logger.info(
                    "%s %s: reading %d %s file(s) from %s", source, split, len(files), extension, root
                )
                return datasets.load_dataset(builder, data_files={"train": files}, split="train")
        held = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:8])
        raise DataError(
            f"{source}: no {split!r} split in {root} (it holds {held or 'nothing'}); the layouts read are "
            f"{split}-*.parquet / .arrow, data/{split}-*, {split}/*.parquet, CONFIG/{split}/*.parquet "
            "(the hub's refs/convert/parquet) or a save_to_disk folder"
        )
    if root.exists() or not HUB_ID.fullmatch(location):
        raise DataError(f"{source}: {location} is neither a data folder nor a hub dataset id")
    try:
        return datasets.load_dataset(location, split=split)
    except Exception as exc:
        raise DataError(
            f"{source}: could not load {location!r} split {split!r} from the hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); set data.path to a local copy"
        ) from None


def require_columns(table: Any, source: str, needed: Iterable[str], where: str) -> None:
    """Fail at start, in one line, when a table lacks columns this source reads."""
    found = list(table.column_names)
    missing = [c for c in needed if c not in found]
    if missing:
        raise DataError(
            f"{source} data at {where} lacks column(s) {', '.join(missing)}: it needs "
            f"{', '.join(needed)}; found {', '.join(found) or 'none'}"
        )


def text_rows(table: Any, image_column: str) -> tuple[Any, list[dict[str, Any]]]:
    """The table with its image column left encoded, and every other column as Python rows."""
    import datasets

    feature = table.features.get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        table = table.cast_column(image_column, datasets.Image(decode=False))
    columns = [c for c in table.column_names if c != image_column]
    data = table.select_columns(columns).to_dict() if columns else {}
    rows = (
        [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
        if data
        else [{} for _ in range(len(table))]
    )
    return table, rows


def label_name(table: Any, column: str, value: Any) -> Any:
    """A ClassLabel's name for an int value (ChartQA's human_or_machine); other values unchanged."""
    import datasets

    feature = table.features.get(column)
    if isinstance(feature, datasets.ClassLabel) and isinstance(value, int):
        return feature.int2str(value)
    return value


def where(path: str | None, default_hub_id: str) -> str:
    return os.fspath(path) if path else default_hub_id
