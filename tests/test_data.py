"""Tests for unified_lora.data: loaders, errors, noise, metrics, encoding."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from unified_lora.data import (
    GLUE_ENV_VAR,
    DataError,
    Example,
    accuracy,
    default_model_path,
    encode,
    f1_binary,
    flip_labels,
    glue_metrics,
    load_glue,
    load_table,
    macro_f1,
    majority_baseline,
    make_loader,
    matthews_corrcoef,
    primary_metric,
    symmetric_label_noise,
)
from unified_lora.data import loaders

SHARED_GLUE = loaders._find_shared_glue()
needs_shared = pytest.mark.skipif(SHARED_GLUE is None, reason="shared/data/glue not found (only MRPC is shipped)")


# ----------------------------------------------------------------- shipped MRPC


def test_shipped_mrpc_is_the_checksummed_file():
    digest = hashlib.sha256((loaders.PACKAGE_GLUE_DIR / "MRPC" / "train.tsv").read_bytes()).hexdigest()
    assert digest == "69abcedee3cf738c6ce58d772e43e1b7cdf5b4edee4aceda459c0d9f4e5599f3"


def test_shipped_mrpc_attribution_exists():
    text = (loaders.PACKAGE_GLUE_DIR.parent / "ATTRIBUTION.md").read_text()
    assert "Dolan" in text and "Wang" in text and "rebuilt" in text


@pytest.mark.parametrize("split,n,pos,neg", [("train", 3668, 2474, 1194), ("dev", 408, 279, 129)])
def test_mrpc_counts_and_balance(split, n, pos, neg):
    ds = load_glue("MRPC", split)
    assert len(ds) == n
    assert Counter(ds.labels) == {1: pos, 0: neg}
    assert ds.num_labels == 2 and ds.label_names == ["not_equivalent", "equivalent"]


def test_mrpc_first_row_has_no_bom_and_keeps_bare_quotes():
    ex = load_glue("mrpc", "train")[0]
    assert ex.text_a.startswith("Amrozi accused") and '" the witness "' in ex.text_a
    assert ex.text_b is not None and ex.label == 1


def test_mrpc_ignores_env_var_and_uses_shipped_copy(monkeypatch, tmp_path):
    monkeypatch.setenv(GLUE_ENV_VAR, str(tmp_path))
    assert len(load_glue("mrpc", "dev")) == 408


def test_glue_task_folder_accepted_as_data_dir():
    assert len(load_glue("mrpc", "dev", data_dir=loaders.PACKAGE_GLUE_DIR / "MRPC")) == 408


# ------------------------------------------------------------ other GLUE tasks


@needs_shared
@pytest.mark.parametrize(
    "task,split,n,counts",
    [
        ("cola", "train", 8551, {1: 6023, 0: 2528}),
        ("cola", "dev", 1043, {1: 721, 0: 322}),
        ("SST-2", "train", 67349, {1: 37569, 0: 29780}),
        ("sst2", "dev", 872, {1: 444, 0: 428}),
        ("rte", "train", 2490, {0: 1249, 1: 1241}),
        ("RTE", "dev", 277, {0: 146, 1: 131}),
    ],
)
def test_shared_glue_counts(task, split, n, counts):
    ds = load_glue(task, split)
    assert len(ds) == n and Counter(ds.labels) == counts


@needs_shared
def test_rte_label_convention_entailment_is_zero():
    first = load_glue("rte", "train")[0]  # GLUE row 0 is not_entailment
    assert first.label == 1 and first.text_b == "Weapons of Mass Destruction Found in Iraq."


@needs_shared
def test_cola_is_single_sentence_and_reads_last_unterminated_line():
    ds = load_glue("cola", "dev")
    assert all(e.text_b is None for e in ds)
    assert ds[-1].text_a.endswith("himself.")


@pytest.mark.parametrize("task, folder, body, line, raw", [
    # GLUE's MRPC test.tsv: no labels, and its first column is the row index, which was read as labels 0, 1, 2, ...
    ("mrpc", "MRPC", "index\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + "".join(
        f"{i}\t{i}\t{i + 9}\tsentence {i}\tother {i}\n" for i in range(4)), 4, "2"),
    ("cola", "CoLA", "gj04\t1\t\tgood one\ngj04\t2\t*\tbad one\n", 2, "2"),
    ("sst2", "SST-2", "sentence\tlabel\nfine\t1\nno label\t-1\n", 3, "-1"),
])
def test_a_glue_label_outside_the_tasks_classes_is_refused(tmp_path, task, folder, body, line, raw):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "dev.tsv").write_text(body)
    with pytest.raises(DataError, match=rf"dev.tsv: line {line} has label '{raw}'; expected one of 0 \(.*\), 1 "
                                        r"\(.*\) \(a GLUE test.tsv has no labels"):
        load_glue(task, "dev", data_dir=tmp_path)


@needs_shared
def test_env_var_locates_glue(monkeypatch):
    monkeypatch.setenv(GLUE_ENV_VAR, str(SHARED_GLUE))
    monkeypatch.setattr(loaders, "_find_shared_glue", lambda: None)
    assert len(load_glue("rte", "dev")) == 277


def test_unshipped_task_without_dir_says_how_to_fix(monkeypatch):
    monkeypatch.delenv(GLUE_ENV_VAR, raising=False)
    monkeypatch.setattr(loaders, "_find_shared_glue", lambda: None)
    with pytest.raises(DataError, match=GLUE_ENV_VAR):
        load_glue("cola", "train")


def test_unknown_glue_task_and_split():
    with pytest.raises(DataError, match="qqp"):
        load_glue("qqp", "train")
    with pytest.raises(DataError, match="test"):
        load_glue("mrpc", "test")


# ------------------------------------------------------------------ tables


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_string_labels_sorted_ids(tmp_path):
    p = _write(tmp_path / "d.csv", 'text,label\n"hello, world",pos\nbad day,neg\nok,neutral\n')
    ds = load_table(p, ["text"], "label")
    assert ds.label_names == ["neg", "neutral", "pos"] and ds.num_labels == 3
    assert ds.examples[0] == Example("hello, world", None, 2)


def test_csv_with_bom_header_finds_first_column(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes("\ufefftext,label\nhi,1\n".encode("utf-8"))
    assert load_table(p, ["text"], "label").examples == [Example("hi", None, 1)]


def test_tsv_pair_with_bare_quotes(tmp_path):
    p = _write(tmp_path / "d.tsv", 'a\tb\ty\nsay "hi\tthere\t1\nx\ty\t0\n')
    ds = load_table(p, ["a", "b"], "y")
    assert ds.examples[0] == Example('say "hi', "there", 1)
    assert ds.num_labels == 2 and ds.label_names is None


def test_jsonl_int_and_string_labels(tmp_path):
    p = _write(tmp_path / "d.jsonl", '{"t": "a", "y": 0}\n\n{"t": "b", "y": 2}\n')
    assert load_table(p, ["t"], "y").labels == [0, 2]
    q = _write(tmp_path / "e.jsonl", '{"t": "a", "y": "spam"}\n{"t": "b", "y": "ham"}\n')
    assert load_table(q, ["t"], "y").labels == [1, 0]


def test_label_names_fixes_mapping(tmp_path):
    p = _write(tmp_path / "d.csv", "text,label\na,pos\nb,neg\n")
    ds = load_table(p, ["text"], "label", label_names=["pos", "neg"])
    assert ds.labels == [0, 1] and ds.label_names == ["pos", "neg"]


def test_fmt_overrides_extension(tmp_path):
    p = _write(tmp_path / "d.txt", json.dumps({"t": "a", "y": 1}) + "\n")
    assert load_table(p, ["t"], "y", fmt="jsonl").labels == [1]


# ----------------------------------------------------------------- DataError


def test_error_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match="nope.csv"):
        load_table(missing, ["text"], "label")


def test_error_missing_glue_dir_names_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        load_glue("rte", "dev", data_dir=tmp_path)


def test_error_unknown_column_lists_columns(tmp_path):
    p = _write(tmp_path / "d.csv", "sentence,label\na,1\n")
    with pytest.raises(DataError) as err:
        load_table(p, ["text"], "label")
    msg = str(err.value)
    assert "'text'" in msg and "sentence" in msg and "\n" not in msg


def test_error_empty_dataset(tmp_path):
    p = _write(tmp_path / "d.csv", "text,label\n")
    with pytest.raises(DataError, match="no data rows"):
        load_table(p, ["text"], "label")


def test_error_unsupported_extension(tmp_path):
    p = _write(tmp_path / "d.xlsx", "")
    with pytest.raises(DataError, match="xlsx"):
        load_table(p, ["text"], "label")


def test_error_label_not_in_label_names(tmp_path):
    p = _write(tmp_path / "d.csv", "text,label\na,pos\nb,meh\n")
    with pytest.raises(DataError, match="'meh'"):
        load_table(p, ["text"], "label", label_names=["neg", "pos"])


def test_integer_class_names_match_labels_by_value_never_as_ids(tmp_path):
    """With label_names that are numbers (train labels -1/0/1 give the classes ['-1', '0', '1']), a label 2 was read
    as an id into them, the class '1', silently. A label matches such a name by value (1.0 is the class '1')."""
    p = _write(tmp_path / "d.csv", "text,label\na,1.0\nb,-1\nc,0\n")
    assert load_table(p, ["text"], "label", label_names=["-1", "0", "1"]).labels == [2, 0, 1]
    q = _write(tmp_path / "e.csv", "text,label\na,1\nb,2\n")
    with pytest.raises(DataError, match=r"e.csv: record 2 \(line 3\) has label '2', which is not one of the classes "
                                        r"\['-1', '0', '1'\]"):
        load_table(q, ["text"], "label", label_names=["-1", "0", "1"])
    # names that are words: an integer is still an id into them, unless names_only (the CLI's dev set)
    assert load_table(q, ["text"], "label", label_names=["a", "b", "c"]).labels == [1, 2]
    with pytest.raises(DataError, match=r"record 1 \(line 2\) has label '1', which is not one of the classes"):
        load_table(q, ["text"], "label", label_names=["a", "b", "c"], names_only=True)


def test_error_regression_or_multi_label_labels_name_the_record(tmp_path):
    """STS-B-style float scores used to become one class per distinct value (a 170-class head for 180 rows, and a
    majority baseline of 0), and multi-label lists one class per combination; both are refused, naming the record.
    Whole numbers written as floats and other names still become classes."""
    p = tmp_path / "sts.csv"
    p.write_text("text,label\na,4.0\nb,3.8\nc,1\n")
    with pytest.raises(DataError, match=r"column 'label' holds non-integer numbers \(record 2 \(line 3\): '3.8'\), i.e. "
                                        "regression targets"):
        load_table(p, ["text"], "label")
    p = tmp_path / "ml.jsonl"
    p.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": [0, 1]}\n')
    with pytest.raises(DataError, match=r"record 2 \(line 3\) has the label \[0, 1\] \(a list\); multi-label"):
        load_table(p, ["text"], "label")
    p = tmp_path / "ok.jsonl"
    p.write_text('{"text": "a", "label": 1.0}\n{"text": "b", "label": 0.0}\n{"text": "c", "label": "0.5x"}\n')
    assert load_table(p, ["text"], "label").label_names == ["0.0", "0.5x", "1.0"]


def test_error_null_text_names_the_record(tmp_path):
    """A JSON null text (pandas writes NaN so) used to train as the word 'None'."""
    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "good", "label": 1}\n\n{"text": null, "label": 0}\n')
    with pytest.raises(DataError, match=r"record 2 \(line 3\) has no text \(column 'text' is null\)"):
        load_table(p, ["text"], "label")


@pytest.mark.parametrize("fmt, body, columns, where", [
    ("csv", "text,label\ngood,1\n,0\nbad,0\n", ["text"],
     r"record 2 \(line 3\) has no text \(column 'text' is empty\)"),
    ("csv", 'text,label\n"good\nfilm",1\nbad,0\n"  ",1\n', ["text"],
     r"record 3 \(line 5\) has no text \(column 'text' is whitespace only\)"),
    ("tsv", "a\tb\tlabel\ngood\tfine\t1\nbad\t\t0\n", ["a", "b"],
     r"record 2 \(line 3\) has no text \(column 'b' is empty\)"),
    ("jsonl", '{"a": "good", "b": "fine", "y": 1}\n\n\n{"a": " ", "b": "bad", "y": 0}\n', ["a", "b"],
     r"record 2 \(line 4\) has no text \(column 'a' is whitespace only\)"),
])
def test_an_empty_text_cell_is_refused_naming_the_file_record_and_column(tmp_path, fmt, body, columns, where):
    """An empty or whitespace-only text (either of a pair's two) trained on `[CLS] [SEP]` alone, silently."""
    p = _write(tmp_path / f"d.{fmt}", body)
    label = "y" if fmt == "jsonl" else "label"
    with pytest.raises(DataError, match=rf"d.{fmt}: {where}; a classifier would train on an input of no words"):
        load_table(p, columns, label)


@pytest.mark.parametrize("task, folder, body, line, column", [
    ("mrpc", "MRPC", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tone\ttwo\n0\t3\t4\tthree\t \n", 3,
     "5 ('#2 String')"),
    ("cola", "CoLA", "gj04\t1\t\tgood one\ngj04\t0\t*\t\n", 2, "4"),
])
def test_an_empty_text_in_a_glue_file_is_refused_naming_the_line_and_column(tmp_path, task, folder, body, line,
                                                                             column):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "train.tsv").write_text(body)
    with pytest.raises(DataError, match=rf"train.tsv: line {line} has no text \(column {re.escape(column)} is "):
        load_glue(task, "train", data_dir=tmp_path)


def test_a_bad_row_of_a_glue_file_is_named_at_its_line_in_the_file_past_blank_lines(tmp_path):
    """The GLUE readers counted rows, not lines: a blank line (a header too, in the test.tsv) put the bad row's
    "line N" above where the file has it."""
    (tmp_path / "SST-2").mkdir()
    dev = tmp_path / "SST-2" / "dev.tsv"
    for body, error in (("sentence\tlabel\n\nfine\t1\n\n\nbad\t7\n", "line 6 has label '7'"),
                        ("sentence\tlabel\nfine\t1\n\n \t0\n", "line 4 has no text (column 1 ('sentence')"),
                        ("\nsentence\tlabel\nfine\t1\n\nshort\n", "line 5 has 1 columns")):
        dev.write_text(body)
        with pytest.raises(DataError, match=re.escape(f"dev.tsv: {error}")):
            load_glue("sst2", "dev", data_dir=tmp_path)
    test = _write(tmp_path / "test.tsv", "index\tsentence\n0\tfine\n\n1\t \n")  # GLUE's unlabelled layout
    with pytest.raises(DataError, match=re.escape("test.tsv: line 4 has no text (column 2 ('sentence')")):
        loaders.load_glue_rows("sst2", test)


def test_a_nested_json_text_is_refused_not_trained_as_its_repr(tmp_path):
    """A JSON object or list in a text column trained on its Python repr ("{'title': 'hi', 'body': 'there'}")."""
    p = _write(tmp_path / "d.jsonl", '{"t": "fine", "y": 1}\n{"t": {"title": "hi", "body": "there"}, "y": 0}\n')
    with pytest.raises(DataError, match=r"d.jsonl: record 2 \(line 2\) has a JSON object in column 't', not a text"):
        load_table(p, ["t"], "y")
    q = _write(tmp_path / "e.jsonl", '{"a": "fine", "b": ["x", "y"], "y": 1}\n')
    with pytest.raises(DataError, match=r"record 1 \(line 1\) has a JSON list in column 'b', not a text"):
        load_table(q, ["a", "b"], "y")


def test_error_a_duplicated_column_name_is_refused_not_read_as_its_last_copy(tmp_path):
    """A header naming the text column twice (a spreadsheet's copied column) used to train on the last copy, silently
    (a dict keeps one value per key); a duplicate of a column that is not read stays harmless."""
    p = _write(tmp_path / "d.csv", "text,label,text\ngood film,1,zzz\nbad film,0,zzz\n")
    with pytest.raises(DataError, match=r"d.csv: the header names column 'text' 2 times \(columns 1, 3\)"):
        load_table(p, ["text"], "label")
    q = _write(tmp_path / "e.tsv", "id\ttext\tid\tlabel\n1\tgood film\t1\t1\n")
    assert load_table(q, ["text"], "label").examples == [Example("good film", None, 1)]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_error_a_file_that_is_not_utf8_is_named(tmp_path, fmt):
    """An Excel (cp1252) file was a bare "'utf-8' codec can't decode byte 0xe9 in position 16", naming no file."""
    body = {"csv": "text,label\ncaf\u00e9 ok,1\n", "tsv": "text\tlabel\ncaf\u00e9 ok\t1\n",
            "jsonl": '{"text": "caf\u00e9 ok", "label": 1}\n'}[fmt]
    p = tmp_path / f"d.{fmt}"
    p.write_bytes(body.encode("cp1252"))
    with pytest.raises(DataError, match=rf"d.{fmt} is not UTF-8 text \(byte 0xe9 at offset \d+, line \d\); save it as "
                                         "UTF-8"):
        load_table(p, ["text"], "label")


@pytest.mark.parametrize("bom", [False, True], ids=["plain", "utf8_bom"])
@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_a_byte_that_is_not_utf8_is_named_at_its_file_offset_and_line_after_a_utf8_mark(tmp_path, fmt, bom):
    """After a UTF-8 byte-order mark (Excel's "CSV UTF-8") the error named the byte 3 before the bad one, at an offset
    3 short (utf-8-sig's decoder counts from after the mark it skips), and a bad byte near a line's start on the line
    before."""
    import codecs

    body = {"csv": b"text,label\ngood,1\n\xe9t\xe9,0\n", "tsv": b"text\tlabel\ngood\t1\n\xe9t\xe9\t0\n",
            "jsonl": b'{"text": "good", "label": 1}\n{"\xe9": "t", "label": 0}\n'}[fmt]
    data = (codecs.BOM_UTF8 if bom else b"") + body
    p = tmp_path / f"d.{fmt}"
    p.write_bytes(data)
    at, line = data.index(b"\xe9"), 3 if fmt != "jsonl" else 2
    with pytest.raises(DataError, match=rf"d.{fmt} is not UTF-8 text \(byte 0xe9 at offset {at}, line {line}\); save "
                                        "it as UTF-8"):
        load_table(p, ["text"], "label")


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_a_row_with_other_fields_than_the_header_is_named_at_its_line(tmp_path, fmt):
    """The line was the row's count (the header's 1, then 2, ...), not its line in the file: a quoted cell that spans
    lines and a blank line before the row put it lines later."""
    sep = "," if fmt == "csv" else "\t"
    first = '"a review\nover two lines"' if fmt == "csv" else "a review"  # (a .tsv has no quoting)
    body = f"text{sep}label\n{first}{sep}1\n\nbad film{sep}0{sep}extra\n"
    p = _write(tmp_path / f"d.{fmt}", body)
    line = 5 if fmt == "csv" else 4
    with pytest.raises(DataError, match=rf"d.{fmt}: line {line} has 3 fields but the header has 2; fix that row"):
        load_table(p, ["text"], "label")


_UNICODE_BODIES = {"csv": "text,label\ncaf\u00e9 \u00fcber \U0001f600,pos\nbad film,neg\n",
                   "tsv": "text\tlabel\ncaf\u00e9 \u00fcber \U0001f600\tpos\nbad film\tneg\n",
                   "jsonl": '{"text": "caf\u00e9 \u00fcber \U0001f600", "label": "pos"}\n\n'
                            '{"text": "bad film", "label": "neg"}\n'}


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_a_utf16_or_utf32_file_with_its_byte_order_mark_reads_as_its_utf8_copy(tmp_path, fmt, encoding):
    """Excel's "Unicode Text" and PowerShell 5's Out-File write UTF-16 with a byte-order mark; it was refused as "not
    UTF-8 text (byte 0xff at offset 0)". It is decoded, as is UTF-32; a mark alone is an empty file, as UTF-8's is."""
    import codecs

    body = _UNICODE_BODIES[fmt]
    bom = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE, "utf-32-le": codecs.BOM_UTF32_LE,
           "utf-32-be": codecs.BOM_UTF32_BE}[encoding]
    wide = tmp_path / "w" / f"d.{fmt}"
    wide.parent.mkdir()
    wide.write_bytes(bom + body.replace("\n", "\r\n").encode(encoding))  # (Windows line ends, as Excel writes)
    got = load_table(wide, ["text"], "label")
    assert got == load_table(_write(tmp_path / f"d.{fmt}", body), ["text"], "label")
    assert got.examples[0].text_a == "caf\u00e9 \u00fcber \U0001f600" and got.label_names == ["neg", "pos"]
    (tmp_path / f"bom.{fmt}").write_bytes(bom + " \r\n".encode(encoding))
    with pytest.raises(DataError, match=rf"bom.{fmt} is empty; it needs data rows"):
        load_table(tmp_path / f"bom.{fmt}", ["text"], "label")
    name = encoding[:6].upper()
    broken = tmp_path / f"b.{fmt}"  # a lone surrogate: not UTF-16 (nor UTF-32) text
    broken.write_bytes(bom + body.encode(encoding) + "\ud800x\n".encode(encoding, "surrogatepass"))
    at = len(bom + body.encode(encoding))
    with pytest.raises(DataError, match=rf"b.{fmt} starts with a {name} byte-order mark but is not {name} text "
                                        rf"\(.+ at offset {at}, line 4\); save it as UTF-8"):
        load_table(broken, ["text"], "label")


def test_a_utf16_text_corpus_reads_as_its_utf8_copy_and_utf16_without_a_mark_is_refused(tmp_path):
    """A causal LM's .txt corpus (and predict's .txt prompts) are read by the same reader: UTF-16 with its mark is
    decoded (it was "not UTF-8 text"), and without one it is refused by its NULs, not read as text with a NUL before
    every character."""
    import codecs

    from unified_lora.training import _load_texts

    text = "first line caf\u00e9\nsecond line\n"
    (tmp_path / "w.txt").write_bytes(codecs.BOM_UTF16_LE + text.encode("utf-16-le"))
    assert _load_texts(tmp_path / "w.txt", ["text"]) == _load_texts(_write(tmp_path / "p.txt", text), ["text"])
    (tmp_path / "n.txt").write_bytes("first line\nsecond line\n".encode("utf-16-le"))
    with pytest.raises(DataError, match=r"n.txt: line 1 holds a NUL character \(0x00\); is it UTF-16 without a "
                                        r"byte-order mark\? save it as UTF-8"):
        _load_texts(tmp_path / "n.txt", ["text"])
    (tmp_path / "n.txt").write_bytes(text.encode("utf-16-le"))  # its é is no UTF-8 (0xe9 0x00)
    with pytest.raises(DataError, match=r"n.txt is not UTF-8 text \(byte 0xe9 at offset 28, line 1\); is it UTF-16 "
                                        r"without a byte-order mark\? save it as UTF-8"):
        _load_texts(tmp_path / "n.txt", ["text"])


def test_error_malformed_jsonl_line_number(tmp_path):
    p = _write(tmp_path / "d.jsonl", '{"t": "a", "y": 0}\n{"t": "b", "y": \n')
    with pytest.raises(DataError, match="line 2"):
        load_table(p, ["t"], "y")


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


# -------------------------------------------------------------------- noise


@pytest.mark.parametrize("rate,k", [(0.2, 2), (0.4, 3)])
def test_noise_rate_matches_request(rate, k):
    labels = [i % k for i in range(10_000)]
    noisy = symmetric_label_noise(labels, rate, k, seed=1)
    measured = np.mean(np.array(noisy) != np.array(labels))
    assert abs(measured - rate) < 0.02  # ~5 sigma at n = 10k
    assert set(noisy) <= set(range(k))


def test_noise_replacement_is_uniform_over_other_classes():
    noisy = symmetric_label_noise([0] * 9000, 1.0, 4, seed=0)
    counts = Counter(noisy)
    assert 0 not in counts and all(abs(counts[c] - 3000) < 200 for c in (1, 2, 3))


def test_noise_is_deterministic_and_seeded():
    labels = [0, 1] * 500
    assert symmetric_label_noise(labels, 0.3, 2, seed=7) == symmetric_label_noise(labels, 0.3, 2, seed=7)
    assert symmetric_label_noise(labels, 0.3, 2, seed=7) != symmetric_label_noise(labels, 0.3, 2, seed=8)


def test_noise_sets_are_nested_across_rates():
    labels = [i % 3 for i in range(3000)]
    low = symmetric_label_noise(labels, 0.1, 3, seed=3)
    high = symmetric_label_noise(labels, 0.3, 3, seed=3)
    assert all(h == l for l, h, y in zip(low, high, labels) if l != y)


def test_noise_rejects_bad_rate():
    with pytest.raises(ValueError):
        symmetric_label_noise([0, 1], 1.5, 2)


def test_flip_labels_binary_multiclass_and_tensor():
    assert flip_labels([0, 1, 1]) == [1, 0, 0]
    assert flip_labels([0, 1, 2], num_classes=3) == [1, 2, 0]
    assert torch.equal(flip_labels(torch.tensor([0, 1]), num_classes=2), torch.tensor([1, 0]))


# ------------------------------------------------------------------ metrics


def test_accuracy_and_f1_hand_computed():
    preds, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # tp=2 fp=1 fn=1 tn=1
    assert accuracy(preds, labels) == pytest.approx(3 / 5)
    assert f1_binary(preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_mcc_hand_computed():
    preds, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    expected = (2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2)  # (tp*tn - fp*fn)/sqrt(...)
    assert matthews_corrcoef(preds, labels) == pytest.approx(expected)
    assert matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)


def test_mcc_zero_for_constant_predictions():
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0
    assert matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0


def test_degenerate_f1_is_zero_not_nan():
    assert f1_binary([0, 0, 0], [0, 0, 0]) == 0.0
    assert macro_f1([0, 0], [0, 0]) == pytest.approx(1.0)


def test_macro_f1_hand_computed():
    # class 0: tp=1 fp=0 fn=1 -> 2/3; class 1: tp=1 fp=1 fn=0 -> 2/3; class 2: tp=1 -> 1
    assert macro_f1([0, 1, 1, 2], [0, 0, 1, 2]) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_glue_metrics_keys_per_task():
    p, y = [1, 0, 1], [1, 1, 1]
    assert set(glue_metrics("mrpc", p, y)) == {"f1", "accuracy"}
    assert set(glue_metrics("RTE", p, y)) == {"accuracy"}
    assert set(glue_metrics("cola", p, y)) == {"mcc", "accuracy"}
    assert set(glue_metrics("sst-2", p, y)) == {"accuracy"}
    assert set(glue_metrics("custom", p, y)) == {"accuracy", "macro_f1"}
    assert primary_metric("MRPC") == "f1" and primary_metric("cola") == "mcc"


def test_metrics_reject_length_mismatch():
    with pytest.raises(ValueError):
        accuracy([0, 1], [0])


def test_majority_baseline_mrpc_matches_glue_paper():
    m = majority_baseline(load_glue("mrpc", "train").labels, load_glue("mrpc", "dev").labels, "mrpc")
    assert m["accuracy"] == pytest.approx(279 / 408)
    assert m["f1"] == pytest.approx(2 * 279 / (2 * 279 + 129))  # 81.2, as in GLUE's table


def test_majority_baseline_cola_mcc_is_zero():
    assert majority_baseline([1, 1, 0], [0, 1, 1, 0], "cola") == {"mcc": 0.0, "accuracy": 0.5}


# --------------------------------------------------------- encode / loader


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)


def test_default_model_path_has_config():
    assert (Path(default_model_path()) / "config.json").is_file()


def test_encode_pairs_with_minilm(tokenizer):
    examples = load_glue("mrpc", "dev").examples[:8]
    enc = encode(tokenizer, examples, max_length=32)
    assert enc["input_ids"].shape == enc["attention_mask"].shape
    assert enc["input_ids"].shape[0] == 8 and enc["input_ids"].shape[1] <= 32
    assert enc["labels"].tolist() == [e.label for e in examples]
    if "token_type_ids" in enc:  # BERT-style pair encoding marks the second sentence
        assert enc["token_type_ids"].max().item() == 1


def test_encode_single_sentence_pads_to_max_length(tokenizer):
    enc = encode(tokenizer, [Example("hi", None, 0), Example("a longer sentence", None, 1)], 16, padding="max_length")
    assert enc["input_ids"].shape == (2, 16) and enc["labels"].dtype == torch.long


def _order(loader) -> list[int]:
    return [i for batch in loader for i in batch["labels"].tolist()]


def test_loader_order_is_deterministic_given_seed():
    encoded = {"input_ids": torch.arange(40).view(20, 2), "labels": torch.arange(20)}
    a = _order(make_loader(encoded, 4, shuffle=True, seed=5))
    torch.manual_seed(123)  # the global RNG must not matter
    b = _order(make_loader(encoded, 4, shuffle=True, seed=5))
    c = _order(make_loader(encoded, 4, shuffle=True, seed=6))
    assert a == b and a != c and sorted(a) == list(range(20))


def test_loader_yields_dict_batches_unshuffled():
    encoded = {"input_ids": torch.arange(10).view(5, 2), "labels": torch.arange(5)}
    batches = list(make_loader(encoded, 2, shuffle=False))
    assert [len(b["labels"]) for b in batches] == [2, 2, 1]
    assert batches[0]["input_ids"].tolist() == [[0, 1], [2, 3]]


@pytest.mark.parametrize("fmt,body,why,line", [
    ("jsonl", '{"t": "a", "y": 0}\n  \n{"t": "b", "y": null}\n{"t": "c", "y": 1}\n', "null", 3),
    ("csv", "t,y\na,pos\nb,\nc,neg\n", "empty", 3),
    ("csv", "t,y\na,pos\n\nb,  \nc,neg\n", "empty", 4),
])
def test_a_missing_label_is_an_error_not_a_class_of_its_own(tmp_path, fmt, body, why, line):
    path = tmp_path / f"d.{fmt}"
    path.write_text(body)
    with pytest.raises(DataError, match=rf"record 2 \(line {line}\) has no label \(column 'y' is {why}\)"):
        load_table(path, ["t"], "y")


def test_a_label_error_in_a_jsonl_with_blank_lines_and_unlabelled_rows_names_the_records_line(tmp_path):
    """The label and text errors named the record alone ("record 3"), where a .jsonl file's blank lines put it on
    another line; they name its line too, as a record without a key did. Rows without labels (predict's
    `unlabelled_rows`) are still counted as records."""
    p = _write(tmp_path / "d.jsonl", '{"t": "a", "y": "pos"}\n\n{"t": "b"}\n\n{"t": "c", "y": "meh"}\n')
    with pytest.raises(DataError, match=r"d.jsonl: record 3 \(line 5\) has label 'meh', which is not one of the "
                                        r"classes \['neg', 'pos'\]"):
        load_table(p, ["t"], "y", label_names=["neg", "pos"], unlabelled_rows=True)


def _copy_of_loaders(root: Path) -> ModuleType:
    """loaders.py, imported from a copy at root/.../data/loaders.py: _find_shared_glue reads its own __file__."""
    path = root / "unified_lora" / "data" / "loaders.py"
    path.parent.mkdir(parents=True)
    shutil.copy2(loaders.__file__, path)
    spec = importlib.util.spec_from_file_location("_loaders_copy", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_an_installed_package_does_not_pick_up_a_shared_glue_folder_on_its_way_to_the_root(tmp_path):
    # a wheel in <prefix>/lib/python3.11/site-packages; an unrelated <prefix-parent>/shared/data/glue (e.g.
    # /tmp/shared) used to be taken for RTE, CoLA and SST-2 without a word
    (tmp_path / "shared" / "data" / "glue").mkdir(parents=True)
    installed = _copy_of_loaders(tmp_path / "venv" / "lib" / "python3.11" / "site-packages")
    assert installed._find_shared_glue() is None
    # a source checkout beside the workspace's shared/ still finds it
    (tmp_path / "ws" / "repo").mkdir(parents=True)
    (tmp_path / "ws" / "repo" / "pyproject.toml").write_text("[project]\nname = 'unified-lora'\n")
    (tmp_path / "ws" / "shared" / "data" / "glue").mkdir(parents=True)
    checkout = _copy_of_loaders(tmp_path / "ws" / "repo" / "src")
    assert checkout._find_shared_glue() == (tmp_path / "ws" / "shared" / "data" / "glue").resolve()


def test_a_package_installed_right_under_the_root_finds_no_shared_glue_and_says_so(tmp_path, monkeypatch):
    # at /unified_lora/data/loaders.py (a container image that copies the package to /), `here.parents[3]` does not
    # exist: RTE, CoLA and SST-2 raised IndexError, an internal error, instead of the DataError that says what to pass
    module = _copy_of_loaders(tmp_path)
    module.__file__ = "/unified_lora/data/loaders.py"
    monkeypatch.delenv(module.GLUE_ENV_VAR, raising=False)
    assert module._find_shared_glue() is None
    with pytest.raises(module.DataError, match="pass data_dir="):
        module.resolve_glue_dir("rte")


def test_a_corpus_too_short_to_split_names_the_dev_fraction_and_both_ways_out():
    """split_corpus's refusal told a user to pass --dev-data alone; `train --dev-fraction` sets the split too."""
    from unified_lora.training import DataError, TextCorpus, split_corpus

    with pytest.raises(DataError, match=r"too short to hold out 10% of it as dev text \(--dev-fraction 0.1\); pass "
                                        r"another --dev-fraction, or a --dev-data file"):
        split_corpus(TextCorpus(["ab\n"]), 0.1)
