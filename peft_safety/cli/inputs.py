"""Reading the CLI's input files: rows of ``.txt`` / ``.json`` / ``.jsonl[.gz]`` / ``.csv`` / ``.tsv`` files and
prompt lists."""

from __future__ import annotations

import csv
import gzip
import json
import os
from typing import Any

from .errors import UsageError

PROMPT_COLUMNS = ("prompt", "goal", "instruction", "instructions", "question", "text", "sentence")


def _require_file(path: str, flag: str) -> str:
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path!r}: no such file")
    return path


def _output_file(path: str | None, flag: str) -> None:
    """Refuse an output file that cannot be written (missing folder, a folder, no permission) before any work."""
    if path is None:
        return
    from .._files import check_output_file

    try:
        check_output_file(path, "file")
    except OSError as err:
        raise UsageError(f"{flag} {path!r}: {err}") from err


def _output_dir(path: str, flag: str) -> None:
    """Refuse an output folder that cannot be created or written before any work."""
    from .._files import check_output_dir

    try:
        check_output_dir(path, "folder")
    except OSError as err:
        raise UsageError(f"{flag} {path!r}: {err}") from err


def read_rows(path: str, headerless: bool = False) -> list[dict[str, Any]]:
    """Rows of a data file as dicts: ``.txt`` (one ``text`` per line), ``.json`` (list of objects or strings, or
    an object of parallel lists), ``.jsonl`` / ``.jsonl.gz``, ``.csv`` / ``.tsv`` (header row unless
    ``headerless``, then columns are named ``"0"``, ``"1"``, ...).

    The standard library reads them on purpose, not ``datasets.load_dataset``: Arrow would give every JSON row the
    union of all keys (``None`` where absent, which breaks files mixing ``messages`` and ``prompt`` rows) and refuse
    a column whose type changes between rows, pandas would turn CSV cells such as ``NA`` into nulls and ``007`` into
    ``7``, and both would import ``datasets`` (about a second) and write a cache for every file.
    """
    name = path.lower()
    opener = gzip.open if name.endswith(".gz") else open
    name = name.removesuffix(".gz")
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as handle:
            if name.endswith(".txt"):
                rows: list[Any] = [{"text": line.strip()} for line in handle if line.strip()]
            elif name.endswith(".jsonl"):
                rows = [json.loads(line) for line in handle if line.strip()]
            elif name.endswith(".json"):
                data = json.load(handle)
                if isinstance(data, dict):
                    lists = {k: v for k, v in data.items() if isinstance(v, list)}
                    lengths = {len(v) for v in lists.values()}
                    if not lists or len(lengths) != 1:
                        raise UsageError(f"{path!r}: a JSON object must hold lists of equal length (one per column)")
                    keys = list(lists)
                    data = [dict(zip(keys, values, strict=True)) for values in zip(*lists.values(), strict=True)]
                rows = data if isinstance(data, list) else []
            elif name.endswith((".csv", ".tsv")):
                delimiter = "\t" if name.endswith(".tsv") else ","
                if headerless:
                    rows = [{str(i): v for i, v in enumerate(r)} for r in csv.reader(handle, delimiter=delimiter)]
                else:
                    rows = list(csv.DictReader(handle, delimiter=delimiter))
            else:
                raise UsageError(f"{path!r}: unsupported file type (use .txt, .json, .jsonl[.gz], .csv or .tsv)")
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error, gzip.BadGzipFile) as err:
        raise UsageError(f"{path!r} could not be parsed: {err}") from err
    rows = [{"text": r} if isinstance(r, str) else r for r in rows]
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise UsageError(f"{path!r} holds no rows (expected records or strings)")
    return rows


def _pick_column(rows: list[dict[str, Any]], column: str | None, path: str, candidates=PROMPT_COLUMNS) -> str:
    columns = list(rows[0])
    if column is not None:
        if column not in columns:
            raise UsageError(f"{path!r} has no column {column!r}; its columns are {columns}")
        return column
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise UsageError(f"{path!r} has no column among {list(candidates)}; its columns are {columns}: name one")


def load_prompts(path: str, column: str | None = None, limit: int | None = None) -> list[str]:
    """Prompt strings from a data file (column auto-detected unless given; a numeric column means no header)."""
    _require_file(path, "prompt file")
    headerless = column is not None and column.isdigit()
    rows = read_rows(path, headerless)
    column = _pick_column(rows, column, path)
    prompts = [str(row[column]) for row in rows if row.get(column) not in (None, "")]
    return prompts[:limit] if limit else prompts
