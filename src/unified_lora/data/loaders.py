"""Text-classification data: the Example/TextDataset records, GLUE and table loaders."""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

GLUE_ENV_VAR = "UNIFIED_LORA_GLUE_DIR"
PACKAGE_GLUE_DIR = Path(__file__).resolve().parent / "glue"


class DataError(ValueError):
    """A data problem, described in one line: what is wrong and how to fix it."""


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: int


@dataclass
class TextDataset:
    examples: list[Example]
    num_labels: int
    label_names: list[str] | None = None
    name: str = ""

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    @property
    def labels(self) -> list[int]:
        return [e.label for e in self.examples]


# --------------------------------------------------------------------------- GLUE


@dataclass(frozen=True)
class _GlueSpec:
    folder: str  # sub-folder name in the GLUE distribution
    header: bool
    text_a: int  # column indices
    text_b: int | None
    label: int
    label_names: tuple[str, ...]
    label_map: dict[str, int] = field(default_factory=dict)  # raw value -> id; empty = int()


# Label ids follow the GLUE / Hugging Face `glue` convention.
_GLUE: dict[str, _GlueSpec] = {
    "mrpc": _GlueSpec("MRPC", True, 3, 4, 0, ("not_equivalent", "equivalent")),
    "rte": _GlueSpec(
        "RTE", True, 1, 2, 3, ("entailment", "not_entailment"),
        {"entailment": 0, "not_entailment": 1},
    ),
    "cola": _GlueSpec("CoLA", False, 3, None, 1, ("unacceptable", "acceptable")),
    "sst2": _GlueSpec("SST-2", True, 0, None, 1, ("negative", "positive")),
}


def normalize_task(task: str) -> str:
    """'SST-2' / 'sst_2' / 'SST2' -> 'sst2'."""
    return re.sub(r"[-_\s]", "", task.lower())


def _find_shared_glue() -> Path | None:
    # Development checkouts (src/unified_lora beside a pyproject.toml, also under an editable install) keep the full
    # GLUE copy in <workspace>/shared/data/glue. An installed package does not look: from site-packages the walk up
    # would take any shared/data/glue on the way to / (e.g. /tmp/shared/...) for RTE, CoLA and SST-2, silently.
    here = Path(__file__).resolve()
    if len(here.parents) < 4 or here.parents[2].name != "src":  # (a package at /unified_lora: parents[3] raised
        return None                                              # IndexError instead of "not shipped, pass data_dir=")
    checkout = here.parents[3]
    if not (checkout / "pyproject.toml").is_file():
        return None
    for parent in (checkout, *checkout.parents):
        candidate = parent / "shared" / "data" / "glue"
        if candidate.is_dir():
            return candidate
    return None


def resolve_glue_dir(task: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding `<Task>/{train,dev}.tsv`: data_dir > shipped (MRPC only) > $UNIFIED_LORA_GLUE_DIR > shared/data/glue."""
    key = normalize_task(task)
    if data_dir is not None:
        return Path(data_dir)
    if key == "mrpc":
        return PACKAGE_GLUE_DIR  # the checksum-verified copy we ship (see ATTRIBUTION.md)
    if os.environ.get(GLUE_ENV_VAR):
        return Path(os.environ[GLUE_ENV_VAR])
    shared = _find_shared_glue()
    if shared is None:
        raise DataError(
            f"GLUE task {task!r} is not shipped with unified_lora; pass data_dir= "
            f"(a folder containing {_GLUE[key].folder}/train.tsv) or set {GLUE_ENV_VAR}"
        )
    return shared


def load_glue(task: str, split: str = "train", data_dir: str | os.PathLike | None = None) -> TextDataset:
    """Load a GLUE task ('mrpc', 'rte', 'cola', 'sst2'/'sst-2') split ('train' or 'dev').

    `data_dir` is the GLUE root (with `MRPC/`, `RTE/`, ... inside) or the task folder itself.
    """
    key = normalize_task(task)
    if key not in _GLUE:
        raise DataError(f"unknown GLUE task {task!r}; choose one of {sorted(_GLUE)}")
    if split not in ("train", "dev"):
        raise DataError(f"unknown split {split!r} for {task!r}; choose 'train' or 'dev'")
    spec = _GLUE[key]
    root = resolve_glue_dir(key, data_dir)
    path = root / spec.folder / f"{split}.tsv"
    if not path.is_file() and (root / f"{split}.tsv").is_file():
        path = root / f"{split}.tsv"  # data_dir pointed at the task folder
    return _load_glue_file(key, path, name=f"{key}/{split}")


_NO_TEST_HINT = "a GLUE test.tsv has no labels: train and evaluate on train.tsv and dev.tsv"


def _load_glue_file(task: str, path: str | os.PathLike, name: str | None = None,
                    label_hint: str = _NO_TEST_HINT, empty_hint: str = _NO_TEST_HINT) -> TextDataset:
    """One file in the layout of a GLUE task's train.tsv/dev.tsv (its columns, header and label values). A label
    that is none of the task's is a DataError ending with `label_hint`; an empty one, with `empty_hint`."""
    key = normalize_task(task)
    if key not in _GLUE:
        raise DataError(f"unknown GLUE task {task!r}; choose one of {sorted(_GLUE)}")
    spec, path = _GLUE[key], Path(path)
    rows = _numbered_rows(path, "\t")  # a row's line in the file: blank lines are no row, and were counted as none
    header = rows[0][1] if spec.header and rows else []
    if spec.header:
        rows = rows[1:]
    examples = []
    for n, row in rows:
        if len(row) <= max(spec.text_a, spec.label, spec.text_b or 0):
            raise DataError(f"{path}: line {n} has {len(row)} columns; is this the GLUE {spec.folder} file?")
        raw = row[spec.label].strip()
        try:
            label = spec.label_map[raw] if spec.label_map else int(raw)
        except (KeyError, ValueError):
            label = -1
        # an int outside the task's ids is no label either: a GLUE test.tsv has none (MRPC's first column there is
        # the row index, which int() read as labels 0, 1, 2, ...; the run then scored against row numbers)
        if not 0 <= label < len(spec.label_names) and not raw:  # (it said "has label ''; expected one of ...")
            raise DataError(f"{path}: line {n} has no label (column {spec.label + 1} is empty); every row of a GLUE "
                            f"{spec.folder} train/dev file has one ({empty_hint})")
        if not 0 <= label < len(spec.label_names):
            expected = list(spec.label_map) or [f"{i} ({name})" for i, name in enumerate(spec.label_names)]
            raise DataError(f"{path}: line {n} has label {raw!r}; expected one of {', '.join(expected)} "
                            f"({label_hint})")
        for col in (spec.text_a, spec.text_b):  # GLUE's own train/dev files have no empty text (checked)
            if col is not None and not row[col].strip():
                named = f" ({header[col]!r})" if col < len(header) else ""
                raise _empty_text_error(path, f"line {n}", f"{col + 1}{named}", row[col])
        text_b = row[spec.text_b].strip() if spec.text_b is not None else None
        examples.append(Example(row[spec.text_a].strip(), text_b, label))
    if not examples:
        raise DataError(f"{path} has no data rows; re-download the GLUE {spec.folder} files")
    return TextDataset(examples, len(spec.label_names), list(spec.label_names), name=name or f"{key}/{path.stem}")


# A GLUE test.tsv (no labels: GLUE's server scores it): a header, the row index in its first column, then the texts.
# (width, text_a, text_b) per task
_GLUE_TEST = {"mrpc": (5, 3, 4), "rte": (3, 1, 2), "cola": (2, 1, None), "sst2": (2, 1, None)}
# its columns, as GLUE's test.tsv names them
_GLUE_TEST_COLUMNS = {"mrpc": "index, #1 ID, #2 ID, #1 String, #2 String", "rte": "index, sentence1, sentence2",
                      "cola": "index, sentence", "sst2": "index, sentence"}


def load_glue_rows(task: str, path: str | os.PathLike) -> tuple[TextDataset, bool, list[str] | None]:
    """(rows, labelled, ids) of a file in a GLUE task's layout, to predict: its train.tsv/dev.tsv (labelled, read as
    `_load_glue_file` reads them), or its test.tsv (told apart by its header: `index` and the texts, no label column;
    every label is -1). `ids` is the file's `index` column where its header opens with one (test.tsv, RTE's dev.tsv),
    else None."""
    key = normalize_task(task)
    if key not in _GLUE:
        raise DataError(f"unknown GLUE task {task!r}; choose one of {sorted(_GLUE)}")
    spec, path = _GLUE[key], Path(path)
    numbered = _numbered_rows(path, "\t")
    rows = [row for _, row in numbered]
    if not rows:
        raise DataError(f"{path} is empty; pass the GLUE {spec.folder} dev.tsv or test.tsv")
    width, text_a, text_b = _GLUE_TEST[key]
    header = [c.strip().lower() for c in rows[0]]
    indexed = header[0] == "index"
    if not (indexed and len(header) == width):
        layout = f"a header row, then {_GLUE_TEST_COLUMNS[key]}"
        labelled = _load_glue_file(key, path, label_hint=f"nor is it a GLUE {spec.folder} test.tsv: {layout}",
                                   empty_hint=f"to predict rows without labels, give them in the layout of the GLUE "
                                              f"{spec.folder} test.tsv: {layout}, no label column")
        return labelled, True, [r[0] for r in rows[1:]] if indexed and spec.header else None
    examples, ids = [], []
    for n, row in numbered[1:]:
        if len(row) != width:
            raise DataError(f"{path}: line {n} has {len(row)} columns; the GLUE {spec.folder} test.tsv has {width} "
                            f"({', '.join(rows[0])})")
        for col in (text_a, text_b):
            if col is not None and not row[col].strip():
                raise _empty_text_error(path, f"line {n}", f"{col + 1} ({rows[0][col]!r})", row[col])
        examples.append(Example(row[text_a].strip(), row[text_b].strip() if text_b is not None else None, -1))
        ids.append(row[0])
    if not examples:
        raise no_rows_error(path)
    return TextDataset(examples, len(spec.label_names), list(spec.label_names), name=f"{key}/{path.stem}"), False, ids


def glue_label_value(task: str, label: int) -> str:
    """Class id `label` of a GLUE task as its files write it (RTE: `entailment`; MRPC, CoLA, SST-2: `0`/`1`)."""
    spec = _GLUE[normalize_task(task)]
    return next((raw for raw, i in spec.label_map.items() if i == label), None) or str(label)


# ---------------------------------------------------------------------- tables


def _read_delimited(path: Path, delimiter: str, quoting: int = csv.QUOTE_NONE) -> list[list[str]]:
    return [row for _, row in _numbered_rows(path, delimiter, quoting)]


def _numbered_rows(path: Path, delimiter: str, quoting: int = csv.QUOTE_NONE) -> list[tuple[int, list[str]]]:
    """(line, row) of each row of a delimited file, the line the row starts on; blank lines are no row."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}; check the path (or data_dir)")
    rows, start = [], 1
    with open_text(path, newline="") as lines:
        reader = csv.reader(lines, delimiter=delimiter, quoting=quoting)
        for row in reader:
            if row:
                rows.append((start, row))
            start = reader.line_num + 1
    return rows


# A byte-order mark names the encoding: UTF-8's is skipped (GLUE's MRPC header and Excel's "CSV UTF-8" start with
# it); UTF-16's (Excel's "Unicode Text", PowerShell 5's Out-File and `>`) and UTF-32's are decoded. UTF-32 LE's mark
# starts with UTF-16 LE's, so it is looked for first.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"), (codecs.BOM_UTF8, "utf-8-sig"))


def text_encoding(path: Path) -> str:
    """The encoding a data file is read in: the one its byte-order mark names, else UTF-8."""
    with open(path, "rb") as f:
        head = f.read(4)
    return next((enc for bom, enc in _BOMS if head.startswith(bom)), "utf-8-sig")


@contextlib.contextmanager
def open_text(path: Path, newline: str | None = None) -> Iterator[Iterator[str]]:
    """The lines of a text data file, decoded (`text_encoding`). Text that does not decode is a DataError naming the
    file, the byte, its offset in the file and its line, not a bare "'utf-8' codec can't decode byte 0xe9 in position
    14" (Excel's cp1252 / Latin-1 CSVs); so is a NUL character, which no text file holds but UTF-16 without a
    byte-order mark read as UTF-8 does before every ASCII character (it was read as text with NULs in it)."""
    encoding = text_encoding(path)
    with path.open(encoding=encoding, newline=newline) as f:
        try:
            yield _text_lines(f, path, encoding)
        except UnicodeDecodeError:
            raise _undecodable(path, encoding) from None


def _text_lines(f, path: Path, encoding: str) -> Iterator[str]:
    for n, line in enumerate(f, start=1):
        if "\x00" in line:
            raise _nul_error(path, n, encoding)
        yield line


def _nul_error(path: Path, line: int, encoding: str) -> DataError:
    hint = ("is it UTF-16 without a byte-order mark? save it as UTF-8" if encoding == "utf-8-sig" else
            "a text file holds none; fix that line")
    return DataError(f"{path}: line {line} holds a NUL character (0x00); {hint}")


def _undecodable(path: Path, encoding: str) -> DataError:
    """The DataError of a file that does not decode in `encoding`, at the first bad byte: the decoder's own offset
    is within the chunk it was given (8 KiB), not the file, so the file is decoded again here, whole."""
    data = path.read_bytes()
    try:
        data.decode(encoding)
        return DataError(f"{path} does not decode as {encoding}; save it as UTF-8")  # (it changed while read)
    except UnicodeDecodeError as e:
        # utf-8-sig's offsets count from after the UTF-8 mark it skipped (e.object is the rest): the file's are past it
        at = e.start + len(data) - len(e.object)
        line = data[:at].decode(encoding, errors="replace").count("\n") + 1
        if encoding == "utf-8-sig":  # (NUL bytes too: UTF-16 without its mark, some of it not ASCII)
            hint = "is it UTF-16 without a byte-order mark? save" if b"\x00" in data else "save"
            return DataError(f"{path} is not UTF-8 text (byte 0x{data[at]:02x} at offset {at}, line {line}); "
                             f"{hint} it as UTF-8 (e.g. Excel: CSV UTF-8)")
        name = encoding.upper()
        return DataError(f"{path} starts with a {name} byte-order mark but is not {name} text ({e.reason} at offset "
                         f"{at}, line {line}); save it as UTF-8")


def read_text(path: Path) -> str:
    """A text data file's whole text, read as `open_text` reads it (its line ends as "\\n"), decoded at once and
    searched for a NUL once (line by line, a 65 MB corpus took 2.6 x as long)."""
    encoding = text_encoding(path)
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError:
        raise _undecodable(path, encoding) from None
    nul = text.find("\x00")
    if nul >= 0:
        raise _nul_error(path, text.count("\n", 0, nul) + 1, encoding)
    return text


def _read_records(path: Path, fmt: str, columns: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The rows of a .jsonl/.csv/.tsv file as dicts. A csv/tsv header that names one of `columns` (the ones the
    caller reads) more than once is a DataError: a dict keeps only the last such column, silently."""
    if fmt == "jsonl":
        if not path.is_file():
            raise DataError(f"data file not found: {path}; check the path")
        records = []
        with open_text(path) as lines:
            for n, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {n} is not valid JSON ({e.msg}); fix or remove that line") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}: line {n} is not a JSON object; each line must be {{\"column\": value, ...}}")
                records.append(record)
        return records
    # TSV files conventionally carry bare quotes (as GLUE does); CSV uses standard quoting.
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
    rows = _read_delimited(path, "\t" if fmt == "tsv" else ",", quoting)
    if not rows:
        return []
    header, body = rows[0], rows[1:]
    for col in dict.fromkeys(columns):
        where = [i + 1 for i, h in enumerate(header) if h == col]
        if len(where) > 1:
            raise DataError(f"{path}: the header names column {col!r} {len(where)} times (columns "
                            f"{', '.join(map(str, where))}); rename all but one, so it is clear which to read")
    for n, row in enumerate(body, start=1):
        if len(row) != len(header):  # (its line: a quoted cell may span lines, and blank lines are no row)
            raise DataError(f"{path}: line {record_line(path, n)} has {len(row)} fields but the header has "
                            f"{len(header)}; fix that row")
    return [dict(zip(header, row)) for row in body]


_INT = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _as_int(value: Any) -> int | None:
    """An int if `value` is an integer or an integer-looking string (CSV cells are strings)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        return int(value)
    return None


def _as_number(value: Any) -> float | None:
    """A finite float if `value` is a number or a number-looking string; None otherwise (bools are not numbers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        x = float(value)
    else:
        return None
    return x if math.isfinite(x) else None


LABEL_NAMES_HINT = "(label_names); add it or fix the data"


def _label_ids(raw: list[Any], label_names: Sequence[str] | None, path: Path, column: str = "label",
               names_only: bool = False, classes_hint: str = LABEL_NAMES_HINT,
               records: Sequence[int] | None = None) -> tuple[list[int], list[str] | None, int]:
    """(class ids, class names, number of classes) of the labels `raw`; `records`: the record number of each (default
    1, 2, ...), which the errors name."""
    at = list(records) if records is not None else list(range(1, len(raw) + 1))
    for n, value in zip(at, raw):  # a missing label is not a class of its own
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{path}: {record_at(path, n)} has no label (column {column!r} is "
                            f"{'null' if value is None else 'empty'}); fill it in or drop the record")
    for n, value in zip(at, raw):  # one class per record: a list is a multi-label record
        if isinstance(value, (list, tuple, dict)):
            raise DataError(f"{path}: {record_at(path, n)} has the label {value!r} (a {type(value).__name__}); "
                            f"multi-label classification is not supported: give each record one class in column "
                            f"{column!r}")
    if label_names is None:  # a column of numbers that are not all whole: regression targets, not class names
        numbers = [_as_number(v) for v in raw]
        fraction = next((i for i, x in enumerate(numbers) if x is not None and not x.is_integer()), None)
        if fraction is not None and all(x is not None for x in numbers):
            raise DataError(f"{path}: column {column!r} holds non-integer numbers ({record_at(path, at[fraction])}: "
                            f"{raw[fraction]!r}), i.e. regression targets; only classification is supported, "
                            "so give class ids (0, 1, ...) or names")
    if label_names is not None:
        names = [str(n) for n in label_names]
        index = {n: i for i, n in enumerate(names)}
        numeric: dict[float, int] = {}  # names that are numbers ("-1", "1.0"): a label matches them by value
        for i, name in enumerate(names):
            if _as_number(name) is not None:
                numeric.setdefault(_as_number(name), i)  # type: ignore[arg-type]
        ids = []
        for n, value in zip(at, raw):
            key = str(value).strip()
            as_int, number = _as_int(value), _as_number(value)
            if key in index:
                ids.append(index[key])
            elif number is not None and number in numeric:
                ids.append(numeric[number])  # 1 for the class "1.0"
            elif not names_only and not numeric and as_int is not None and 0 <= as_int < len(names):
                # already an id into label_names. Not where the names are numbers themselves: with classes
                # ["-1", "0", "1"] a 2 is no class, and it was read as id 2, the class "1"
                ids.append(as_int)
            else:
                raise DataError(f"{path}: {record_at(path, n)} has label {value!r}, which is not one of the classes "
                                f"{names} {classes_hint}")
        return ids, names, len(names)
    ints = [_as_int(v) for v in raw]
    all_int = all(i is not None for i in ints)
    if all_int and min(ints) >= 0:  # type: ignore[type-var]
        return ints, None, max(ints) + 1  # type: ignore[return-value, type-var]
    # Names (or negative ints such as -1/1): ids in sorted order, so the mapping is stable.
    keys = ints if all_int else [str(v).strip() for v in raw]
    uniques = sorted(set(keys))
    index = {k: i for i, k in enumerate(uniques)}
    return [index[k] for k in keys], [str(u) for u in uniques], len(uniques)


def record_lines(path: Path) -> list[int]:
    """The line of a .jsonl/.csv/.tsv file (by its extension; [] for another) that each of its records starts on, the
    records counted as the readers count them (from 1; a .jsonl file's blank lines and a table's header and empty
    lines are no record, but count as lines; a quoted CSV cell may span lines). For errors: the file is read again."""
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("csv", "tsv", "jsonl"):
        return []
    if fmt != "jsonl":
        rows = _numbered_rows(path, "\t" if fmt == "tsv" else ",",
                              csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL)[1:]  # the header is no record
        return [line for line, _ in rows]
    with open_text(path, newline="") as lines:
        return [i for i, line in enumerate(lines, start=1) if line.strip()]


def record_line(path: Path, n: int) -> int | None:
    """The line record `n` (from 1) of a .jsonl/.csv/.tsv file starts on (`record_lines`; None for another format).
    For errors: the file is read again."""
    return _line_of(record_lines(path), n)


def _line_of(lines: Sequence[int], n: int) -> int | None:
    return lines[n - 1] if 0 < n <= len(lines) else None


def record_at(path: Path, n: int, lines: Sequence[int] | None = None) -> str:
    """A record as the errors name it: "record 3 (line 5)", its line as `record_line` finds it (none for a file of
    another format). For errors: the file is read again, unless `lines` (`record_lines(path)`) is given, for a name
    of each record read once."""
    line = _line_of(record_lines(path) if lines is None else lines, n)
    return f"record {n}{f' (line {line})' if line else ''}"


def missing_key_error(records: list[dict[str, Any]], n: int, col: str, path: Path, what: str = "") -> DataError:
    """A .jsonl record (`n`, from 1) without the key `col` that other records have: the record, its line, and the
    columns it has. `what` says what the column is (", the id column")."""
    return DataError(f"{path}: {record_at(path, n)} has no {col!r}{what} (its columns are "
                     f"{list(records[n - 1])}, other records have {col!r}); add it or drop the record")


def check_columns(records: list[dict[str, Any]], columns: Sequence[str], path: Path, hint: str = "") -> None:
    """A DataError for the first record that lacks one of `columns`: an unknown column where no record has it; where
    others have it (a .jsonl record without the key), the record and its line. `hint` ends the unknown-column
    error."""
    for col in columns:
        for n, record in enumerate(records, start=1):
            if col in record:
                continue
            if any(col in r for r in records):  # it said "unknown column 'label' (record 2)" of a column others have
                raise missing_key_error(records, n, col, path)
            raise DataError(f"unknown column {col!r} in {path}; columns are {list(record)}{hint}")


def no_rows_error(path: Path) -> DataError:
    """A table with no data rows: a header alone, or a file with nothing in it (0 bytes, blank lines; a .jsonl file
    has no header at all), which was said to be "a header alone" too; so was a byte-order mark alone (which the
    readers skip: UTF-8's, and UTF-16's, whose mark alone was "not UTF-8 text"), blanks or not."""
    if not read_text(path).strip():  # (a .jsonl file was told of a .csv/.tsv file's header row)
        layout = "a .jsonl file: a JSON object a line" if path.suffix.lower() == ".jsonl" else \
            "a .csv/.tsv file: a header row, then the rows"
        return DataError(f"{path} is empty; it needs data rows ({layout})")
    return DataError(f"{path} has no data rows; a header alone is not a data set")


def _empty_text_error(path: Path, where: str, column: str, value: str) -> DataError:
    """An empty or whitespace-only text cell trained on the special tokens alone (`[CLS] [SEP]`), silently."""
    what = "empty" if not value else "whitespace only"
    return DataError(f"{path}: {where} has no text (column {column} is {what}); a classifier would train on an "
                     "input of no words. Fill it in or drop the record")


def _check_no_null_text(records: list[dict[str, Any]], column: str, path: Path) -> None:
    """A JSON null text (pandas writes NaN so) would train on the word 'None', and a nested JSON object or list on
    its Python repr ("{'title': ..., 'body': ...}")."""
    for n, record in enumerate(records, start=1):
        if column in record and record[column] is None:
            raise DataError(f"{path}: {record_at(path, n)} has no text (column {column!r} is null); fill it in or "
                            "drop the record")
        if isinstance(record.get(column), (dict, list)):
            kind = "JSON object" if isinstance(record[column], dict) else "JSON list"
            raise DataError(f"{path}: {record_at(path, n)} has a {kind} in column {column!r}, not a text; nested "
                            "fields are not read: write the text to train on as a string field of each record")


def load_table(
    path: str | os.PathLike,
    text_columns: Sequence[str],
    label_column: str | None,
    fmt: str | None = None,
    label_names: Sequence[str] | None = None,
    names_only: bool = False,
    unlabelled_rows: bool = False,
    classes_hint: str = LABEL_NAMES_HINT,
) -> TextDataset:
    """Load a .csv/.tsv/.jsonl table (header row for csv/tsv) as a TextDataset.

    Integer labels are used as class ids; string labels get ids in sorted order
    (`label_names` then lists them). Passing `label_names` fixes the mapping: a label
    is one of those names (a number matches a name of equal value: 1 and "1.0"), or, unless
    `names_only` or the names are numbers, an integer id into them. `label_column=None` reads
    rows without labels (to predict them): every label is -1, and `label_names` are kept as given.
    With `unlabelled_rows`, a record without a label (no such key, null, an empty cell) is not an error: its label is
    -1 (predict scores the labelled rows). `classes_hint` ends the error on a label outside `label_names`.
    """
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in ("csv", "tsv", "jsonl"):
        raise DataError(f"unsupported data format {fmt!r} for {path}; use a .csv, .tsv or .jsonl file (or pass fmt=)")
    if isinstance(text_columns, str) or len(text_columns) not in (1, 2):
        raise DataError(f"text_columns must be a list of 1 or 2 column names, got {text_columns!r}")
    # (both trained without a word: a row read as the pair (text, text), or a model reading its label in its input)
    if len(set(text_columns)) < len(text_columns):
        raise DataError(f"text_columns {list(text_columns)}: names column {text_columns[0]!r} twice, so each row "
                        "would be read as a pair of the same text; give one column, or a pair task's two columns")
    if label_column is not None and label_column in text_columns:
        raise DataError(f"label_column {label_column!r} is also one of the text_columns {list(text_columns)}: the "
                        "model would read each row's label in its input; give the column that holds the text")
    columns = [*text_columns, *([label_column] if label_column is not None else [])]
    records = _read_records(path, fmt, columns)
    if not records:
        raise no_rows_error(path)
    check_columns(records, text_columns if unlabelled_rows else columns, path)
    for col in text_columns:
        _check_no_null_text(records, col, path)
        for n, record in enumerate(records, start=1):  # (a causal LM's rows are not read here: it drops empty ones)
            if isinstance(record[col], str) and not record[col].strip():
                raise _empty_text_error(path, record_at(path, n), repr(col), record[col])
    if label_column is None:
        names = [str(n) for n in label_names] if label_names is not None else None
        ids, num_labels = [-1] * len(records), len(names or ())
    elif unlabelled_rows:
        raw = [r.get(label_column) for r in records]
        has = [i for i, v in enumerate(raw) if not (v is None or (isinstance(v, str) and not v.strip()))]
        names, num_labels = [str(n) for n in label_names] if label_names is not None else None, len(label_names or ())
        given: list[int] = []
        if has:
            given, names, num_labels = _label_ids([raw[i] for i in has], label_names, path, label_column, names_only,
                                                  classes_hint, [i + 1 for i in has])
        ids = [-1] * len(records)
        for i, label in zip(has, given):
            ids[i] = label
    else:
        ids, names, num_labels = _label_ids([r[label_column] for r in records], label_names, path, label_column,
                                           names_only, classes_hint)
    examples = [
        Example(
            str(r[text_columns[0]]),
            str(r[text_columns[1]]) if len(text_columns) == 2 else None,
            label,
        )
        for r, label in zip(records, ids)
    ]
    return TextDataset(examples, num_labels, names, name=path.stem)
