"""Loading problem records from local files or the Hugging Face hub, with errors a user can act on.

Local .json/.jsonl/.parquet files go through ``datasets.load_dataset("json"|"parquet")``, which
works with HF_DATASETS_OFFLINE=1. A ``{split}`` placeholder in ``dataset.path`` is filled with the
split being read, so train and test can live side by side (``data/{split}.jsonl``). Anything else
is a hub id. Every failure is a :class:`DataError` naming the file (or hub id), the row and the
field; rows are 0-based record indices, the same numbers that appear in problem ids.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

from raylign.config import DatasetConfig

_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Problem data that cannot be used; the message names the source, row and field."""


def _is_local(path: str) -> bool:
    # Hub ids look like "owner/name": no file suffix, no leading "." "/" or "~", nothing on disk.
    return Path(path).suffix in _FORMATS or path.startswith((".", "/", "~")) or Path(path).exists()


def _first_bad_json_line(path: Path) -> str | None:
    """Where a json/jsonl file stops being valid JSON ("line 3: Expecting ..."), or None if it is valid."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError as e:
        if path.suffix == ".json" and e.msg != "Extra data":
            return f"line {e.lineno}: {e.msg}"
    for lineno, line in enumerate(text.splitlines(), start=1):
        try:
            if line.strip():
                json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {lineno}: {e.msg}"
    return None


def _read_json_lines(path: Path) -> list[dict[str, Any]] | None:
    """Plain-Python read of a syntactically valid jsonl file (rows with mixed field types break Arrow)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows if all(isinstance(r, dict) for r in rows) else None


def _load_local(path_text: str) -> list[dict[str, Any]]:
    path = Path(path_text).expanduser()
    if not path.exists():
        raise DataError(f"{path_text}: file not found (dataset.path)")
    fmt = _FORMATS.get(path.suffix)
    if path.is_file() and not path.read_bytes().strip():
        raise DataError(f"{path_text}: file is empty (dataset.path)")
    import datasets  # after the cheap checks: its import alone takes about a second

    datasets.disable_progress_bars()  # a file read is not a download: no progress lines on stderr
    try:
        if fmt is None:  # a local dataset folder
            return datasets.load_dataset(str(path), split="train").to_list()
        return datasets.load_dataset(fmt, data_files=str(path), split="train").to_list()
    except Exception as e:
        if fmt != "json":
            what = fmt or "a dataset folder"
            raise DataError(f"{path_text}: could not read as {what}: {type(e).__name__}: {e}") from None
        where = _first_bad_json_line(path)
        if where is not None:
            raise DataError(f"{path_text}: {where}") from None
        rows = _read_json_lines(path) if path.suffix == ".jsonl" else None
        if rows is None:
            raise DataError(f"{path_text}: could not read: {type(e).__name__}: {e}") from None
        return rows


def _load_hub(hub_id: str, config: str | None, split: str, local_hint: str | None) -> list[dict[str, Any]]:
    import datasets

    try:
        return datasets.load_dataset(hub_id, name=config, split=split).to_list()
    except Exception as e:
        hint = f" (e.g. {local_hint})" if local_hint else ""
        raise DataError(
            f"could not load hub dataset '{hub_id}' (config {config!r}, split {split!r}): {type(e).__name__}: {e}. "
            f"Offline or without hub access, set dataset.path to a local jsonl{hint}"
        ) from None


def load_records(dataset_cfg: DatasetConfig, default_hub: str | None = None, default_config: str | None = None,
                 split: str | None = None, local_hint: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """Records and a source label (file path or hub id), at most ``dataset_cfg.limit`` of them.

    ``split`` (default ``dataset_cfg.split``) picks the hub split or fills ``{split}`` in a local
    path; a plain local file is read whole whatever the split. ``dataset.path = None`` reads the
    env's ``default_hub`` (with ``default_config``); ``local_hint`` goes into the offline error.
    """
    split = split or dataset_cfg.split
    path = dataset_cfg.path
    if path is None:
        if default_hub is None:
            raise DataError("dataset.path is not set and this env has no built-in data")
        records, source = _load_hub(default_hub, default_config, split, local_hint), default_hub
    elif _is_local(path):
        source = path.replace("{split}", split)
        records = _load_local(source)
    else:
        config = default_config if path == default_hub else None
        records, source = _load_hub(path, config, split, local_hint), path
    if dataset_cfg.limit is not None:
        records = records[: dataset_cfg.limit]
    return records, source


def field(record: dict[str, Any], key: str, source: str, row: int) -> str:
    """``record[key]`` as a string; a missing or null field is a DataError naming source, row and key."""
    value = record.get(key)
    if value is None:
        present = ", ".join(sorted(k for k, v in record.items() if v is not None))
        raise DataError(f"{source}: row {row}: missing field '{key}' (fields: {present})")
    return str(value)


def question_text(record: dict[str, Any], dataset_cfg: DatasetConfig, source: str, row: int) -> str:
    """The question: ``question_template.format(**record)`` when a template is set, else ``record[question_key]``."""
    template = dataset_cfg.question_template
    if template is None:
        return field(record, dataset_cfg.question_key, source, row)
    try:
        names = {name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(template) if name}
    except ValueError as e:
        raise DataError(f"dataset.question_template {template!r}: {e}") from None
    for name in sorted(names):
        field(record, name, source, row)  # raises the missing-field error
    try:
        return template.format(**{k: v for k, v in record.items() if v is not None})
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        where = f"{source}: row {row}: dataset.question_template {template!r}"
        raise DataError(f"{where}: {type(e).__name__}: {e}") from None
