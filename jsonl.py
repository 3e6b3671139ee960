"""JSONL between steps: line-numbered read errors, fsynced appends, atomic whole-file writes.

Every step of the loop reads and writes its rows and JSON files through these functions, so "a resumed step never
duplicates or loses a row" and "malformed input names the file and line" hold everywhere.
"""
import gzip
import json
import os
import tempfile
from pathlib import Path


class DataError(ValueError):
    """Bad input file; the message names the file (and line). CLIs exit 2 on it."""


def read_jsonl(path, required=(), tolerate_torn_tail=False, line_key=None):
    """Rows of a JSONL file (a .gz one through gzip); an unreadable file, a malformed line or a row
    missing a `required` key raises DataError with file:line. With `tolerate_torn_tail` a last line
    without its newline (a killed writer's half row) is dropped instead — only the writer resuming
    its own file should ask for that. `line_key`: each row also holds its line number under it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows = []
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError, EOFError) as e:  # unreadable / truncated gzip
        raise DataError(f"{path}: cannot read ({e})") from None
    last = len(lines) - 1  # text after the final "\n" (empty when the file ends cleanly)
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if tolerate_torn_tail and i - 1 == last:
                break
            raise DataError(f"{path}:{i}: malformed JSON row ({e})") from None
        missing = [k for k in required if k not in row]
        if missing:
            raise DataError(f"{path}:{i}: missing field{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}")
        if line_key:
            row[line_key] = i
        rows.append(row)
    return rows


def truncate_torn_tail(path):
    """Cut a half-written last line (no trailing newline) so appends start on a clean line."""
    path = Path(path)
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def append_jsonl(f, row):
    """One row, flushed and fsynced: a kill after this returns never loses the row."""
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def write_atomic(path, text):
    """Write a whole file via temp file + rename: readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl_atomic(path, rows):
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json_atomic(path, obj):
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path, default=None):
    """A JSON file (config.json, stats.json); `default` when it does not exist. Malformed -> DataError."""
    path = Path(path)
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path}: malformed JSON ({e})") from None


def update_json(path, key, value):
    """Set one top-level key of a JSON object file (stats.json gathers collect/curate/train figures)."""
    obj = read_json(path, {})
    obj[key] = value
    write_json_atomic(path, obj)
