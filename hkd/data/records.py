"""Reading records: JSONL lines and the check every data kind applies to a record's fields.

``kind: jsonl`` reads lines with :func:`read_jsonl`; ``kind: hf`` checks its rows with the same
:func:`value_problem`, so a null field or a broken conversation gets the same message from both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hkd.data.chat import conversation_problem
from hkd.errors import HkdError

Record = dict[str, Any]


def _record_problem(line: str, required: tuple[str, ...],
                    conversations: Mapping[str, bool] | None = None) -> tuple[Record | None, str | None]:
    """(record, None) for a usable line, else (None, what is wrong with it). ``conversations``: fields
    that hold a conversation (True: a training conversation, with an assistant turn) or may hold
    one instead of text (False: a prompt)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, f"malformed JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return None, "malformed JSON (nested too deeply)"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    missing = [f for f in required if f not in record]
    if missing:
        return None, f"missing field(s) {missing}"
    for name in required:  # one check for every data kind (kind: hf checks its rows with it too)
        problem = value_problem(name, record[name], (conversations or {}).get(name))
        if problem:
            return None, problem
    return record, None


def read_jsonl(path: str | Path, on_bad_line: str = "fail", required: tuple[str, ...] = (),
               conversations: Mapping[str, bool] | None = None) -> list[Record]:
    """Read a JSONL file; a malformed line (bad JSON or UTF-8, a missing or null field, a broken
    conversation in one of ``conversations``' fields) names the file and line."""
    p = Path(path)
    if not p.is_file():
        raise HkdError(f"data file {str(p)!r} does not exist")
    records: list[Record] = []
    with p.open("rb") as handle:
        for lineno, raw in enumerate(handle, 1):
            record: Record | None = None
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problem: str | None = f"not valid UTF-8 (byte {exc.start + 1} of the line: {raw[exc.start:exc.start + 1]!r})"
            else:
                if lineno == 1:
                    line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
                if not line.strip():
                    continue
                record, problem = _record_problem(line, required, conversations)
            if problem is not None:
                if on_bad_line == "fail":
                    raise HkdError(f"{p}:{lineno}: {problem}; set data.on_bad_line: skip to skip such lines")
                continue
            assert record is not None
            records.append(record)
    if not records:
        raise HkdError(f"data file {str(p)!r} has no usable records")
    return records


def value_problem(name: str, value: Any, conversation: bool | None = None) -> str | None:
    """What is wrong with one record's field as training input, or ``None``: the check every data kind shares
    (``kind: jsonl`` per line, :func:`read_jsonl`; ``kind: hf`` per row). ``conversation``:
    the field holds a conversation (True: one to train on) or may hold one instead of text (False)."""
    if value is None:  # str(None) would train on the text "None"
        return f"field {name!r} is null"
    if conversation is not None and (isinstance(value, list) or conversation):
        problem = conversation_problem(value, need_assistant=conversation)
        return f"field {name!r}: {problem}" if problem else None
    if isinstance(value, (bool, list, dict)):
        return f"field {name!r} is a {type(value).__name__}, not text"
    return None
