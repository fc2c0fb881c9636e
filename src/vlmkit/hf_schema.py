"""What config validation needs to know of transformers, without importing it (or torch).

A config is checked in well under a second: `TrainingArguments`' fields (their types, and the
choices of its enum fields such as `lr_scheduler_type` and `optim`) and the model types
transformers knows are read from `hf_schema.json`, written for the transformers version the lock
pins (`make schema`). Under any other installed version they are read from transformers itself,
which is correct but costs the import.

    python -m vlmkit.hf_schema --write     # regenerate hf_schema.json for the installed version
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import importlib.metadata
import json
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SCHEMA_FILE = Path(__file__).with_name("hf_schema.json")
SIMPLE_TYPES = {bool: "bool", int: "int", float: "float", str: "str", type(None): "null"}


@functools.cache
def schema() -> dict[str, Any]:
    """The shipped schema when it was written for the installed transformers, else a live one."""
    installed = importlib.metadata.version("transformers")
    try:
        shipped = json.loads(SCHEMA_FILE.read_text())
    except (OSError, json.JSONDecodeError):
        shipped = None
    if shipped is not None and shipped.get("transformers") == installed:
        return shipped
    logger.debug("hf_schema.json is not for transformers %s: reading transformers itself", installed)
    return introspect()


def introspect() -> dict[str, Any]:
    """The schema of the installed transformers (imports it)."""
    import transformers
    from transformers import TrainingArguments
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    hints = typing.get_type_hints(TrainingArguments)
    fields = {
        f.name: _field_entry(hints.get(f.name, Any)) for f in dataclasses.fields(TrainingArguments) if f.init
    }
    return {
        "transformers": transformers.__version__,
        "training_arguments": dict(sorted(fields.items())),
        "model_types": sorted(CONFIG_MAPPING_NAMES),
    }


def _field_entry(hint: Any) -> dict[str, Any]:
    """`types`: the plain types a field takes (absent: anything, e.g. dicts and lists too);
    `choices`: the values of an enum it takes (strings of them are checked against these)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    members = typing.get_args(hint) if union else (hint,)
    enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
    entry: dict[str, Any] = {}
    if enums:
        entry["choices"] = sorted({str(value.value) for e in enums for value in e})
    plain = [m for m in members if m not in enums]
    if all(m in SIMPLE_TYPES for m in plain):
        entry["types"] = sorted(SIMPLE_TYPES[m] for m in plain)
    return entry


def training_fields() -> dict[str, dict[str, Any]]:
    return schema()["training_arguments"]


def model_types() -> list[str]:
    return schema()["model_types"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write", action="store_true", help=f"write {SCHEMA_FILE.name} for this transformers"
    )
    args = parser.parse_args(argv)
    current = introspect()
    if args.write:
        SCHEMA_FILE.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
        logging.basicConfig(level=logging.INFO)
        logger.info("wrote %s for transformers %s", SCHEMA_FILE, current["transformers"])
    else:
        json.dump(current, sys.stdout, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
