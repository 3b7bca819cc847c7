"""Parquet and JSONL column types the metadata layer keeps or refuses in one line: dates, decimals, bytes and
times round-trip; durations, maps and nested dates are refused by name; deep nesting, JSONL line numbers and
mixed int/float columns."""
from __future__ import annotations

import base64
import datetime
import decimal
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.datasets.metadata import MetadataError, read_metadata, read_schema, write_table_atomic

DATE = datetime.date(2024, 2, 29)
TIME = datetime.time(13, 5, 9, 250000)


def kept_types() -> pa.Table:
    """A column of each type the pipeline keeps as text and gives back typed; the second row is null."""
    return pa.table({
        "path": ["a.mp4", "b.mp4"],
        "day": pa.array([DATE, None], pa.date32()),
        "day64": pa.array([DATE, None], pa.date64()),
        "price": pa.array([decimal.Decimal("1.50"), None], pa.decimal128(5, 2)),
        "tiny": pa.array([decimal.Decimal("0.0000001"), None], pa.decimal128(9, 7)),
        "wide": pa.array([decimal.Decimal("-12345678901234567890123456789.5"), None], pa.decimal256(40, 1)),
        "thumb": pa.array([b"\x00\xff\x10", None], pa.binary()),
        "big": pa.array([b"\x01" * 5, None], pa.large_binary()),
        "fixed": pa.array([b"ab", None], pa.binary(2)),
        "at": pa.array([TIME, None], pa.time64("us")),
        "at_s": pa.array([datetime.time(1, 2, 3), None], pa.time32("s")),
        "name": pa.array(["x", ""], pa.large_string()),  # text: a null is ""
        "label": pa.array(["cat", None]).dictionary_encode(),
        "small": pa.array([7, None], pa.int8()),
    })


def test_dates_decimals_bytes_and_times_read_as_text_and_round_trip_to_parquet(tmp_path):
    source, out = tmp_path / "meta.parquet", tmp_path / "out.parquet"
    table = kept_types()
    pq.write_table(table, source)
    cells = read_metadata(source)
    assert cells.iloc[0].to_dict() == {
        "path": "a.mp4", "day": "2024-02-29", "day64": "2024-02-29", "price": "1.50", "tiny": "0.0000001",
        "wide": "-12345678901234567890123456789.5", "thumb": base64.b64encode(b"\x00\xff\x10").decode(),
        "big": base64.b64encode(b"\x01" * 5).decode(), "fixed": "YWI=", "at": "13:05:09.250000",
        "at_s": "01:02:03", "name": "x", "label": "cat", "small": "7"}
    assert set(cells.iloc[1].drop("path")) == {""}
    write_table_atomic(cells, out, read_schema(source))
    back, stored = pq.read_table(out), pq.read_table(source)  # Parquet stores date64 as date32
    assert back.schema.types == stored.schema.types
    assert back.to_pylist() == stored.to_pylist() == table.to_pylist()


def test_kept_types_go_to_jsonl_and_csv_as_their_text(tmp_path):
    source = tmp_path / "meta.parquet"
    pq.write_table(kept_types(), source)
    cells, schema = read_metadata(source), read_schema(source)
    write_table_atomic(cells, tmp_path / "out.jsonl", schema)
    first, second = (json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines())
    assert first["day"] == "2024-02-29" and first["price"] == "1.50" and first["at"] == "13:05:09.250000"
    assert base64.b64decode(first["thumb"]) == b"\x00\xff\x10" and first["small"] == 7
    assert second["day"] is None and second["price"] is None and second["thumb"] is None
    write_table_atomic(cells, tmp_path / "out.csv", schema)
    assert read_metadata(tmp_path / "out.csv").iloc[0]["price"] == "1.50"


def test_an_edited_cell_that_no_longer_fits_is_written_as_text(tmp_path, caplog):
    source, out = tmp_path / "meta.parquet", tmp_path / "out.parquet"
    pq.write_table(kept_types(), source)
    cells = read_metadata(source)
    cells.loc[1, "day"] = "not a date"
    write_table_atomic(cells, out, read_schema(source))
    assert pq.read_table(out).column("day").to_pylist() == ["2024-02-29", "not a date"]
    assert "column 'day' does not fit its input type" in caplog.text


@pytest.mark.parametrize("column, type_name", [
    (pa.array([datetime.timedelta(seconds=3), None], pa.duration("s")), "duration[s]"),
    (pa.array([[("k", 1)], None], pa.map_(pa.string(), pa.int64())), "map<string, int64"),
    (pa.array([[DATE], None], pa.list_(pa.date32())), "list<element: date32[day]>"),
    (pa.array([{"d": decimal.Decimal("1.5")}, None]), "struct<d: decimal128(2, 1)>"),
    (pa.array([[b"x"], None], pa.list_(pa.binary())), "list<element: binary>"),
])
def test_types_without_a_text_form_are_refused_in_one_line_naming_the_column(tmp_path, column, type_name):
    source = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"path": ["a.mp4", "b.mp4"], "odd": column}), source)
    for read in (read_metadata, read_schema):
        with pytest.raises(MetadataError) as exc:
            read(source)
        message = str(exc.value)
        assert "\n" not in message and "column 'odd'" in message and type_name in message, message


def test_deep_nesting_is_one_line_not_a_recursion_error(tmp_path):
    source = tmp_path / "meta.jsonl"
    source.write_text('{"path": "a.mp4"}\n\n{"path": "b.mp4", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(MetadataError) as exc:
        read_metadata(source)
    assert "line 3" in str(exc.value) and "nest" in str(exc.value) and "\n" not in str(exc.value)


def test_a_null_path_is_reported_on_its_own_jsonl_line(tmp_path):
    source = tmp_path / "meta.jsonl"
    source.write_text('{"path": "a.mp4"}\n{"path": null}\n\n{"path": "c.mp4"}\n{"path": "  "}\n')
    with pytest.raises(MetadataError, match=r"2 row\(s\) with an empty 'path' \(line 2, 5\)"):
        read_metadata(source)


def test_a_null_path_in_parquet_is_reported_by_row(tmp_path):
    source = tmp_path / "meta.parquet"
    pq.write_table(pa.table({"path": ["a.mp4", None]}), source)
    with pytest.raises(MetadataError, match=r"1 row\(s\) with an empty 'path' \(row 2\)"):
        read_metadata(source)


def test_a_mixed_int_and_float_column_keeps_each_value_type(tmp_path):
    source = tmp_path / "meta.jsonl"
    values = [1, 2.5, 10_000_000_000_000_000_001, 3.0, None, -4, 1e300]
    source.write_text("".join(json.dumps({"path": f"v{i}.mp4", "n": v}) + "\n" for i, v in enumerate(values)))
    cells, schema = read_metadata(source), read_schema(source)
    assert cells["n"].tolist() == ["1", "2.5", "10000000000000000001", "3.0", "", "-4", "1e+300"]
    write_table_atomic(cells, tmp_path / "out.jsonl", schema)
    back = [json.loads(line)["n"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert back == values and [type(v) for v in back] == [type(v) for v in values]
    write_table_atomic(cells, tmp_path / "out.csv", schema)
    assert read_metadata(tmp_path / "out.csv")["n"].tolist() == cells["n"].tolist()
    write_table_atomic(cells, tmp_path / "out.parquet", schema)  # one Parquet type per column: floats
    assert pq.read_table(tmp_path / "out.parquet").column("n").to_pylist() == [
        1.0, 2.5, 1e19, 3.0, None, -4.0, 1e300]


def test_an_int_column_and_a_float_column_stay_as_they_were(tmp_path):
    source = tmp_path / "meta.jsonl"
    source.write_text('{"path": "a", "i": 1, "f": 1.0}\n{"path": "b", "i": 2, "f": 2.5}\n')
    cells, schema = read_metadata(source), read_schema(source)
    assert (schema["i"].kind, schema["f"].kind) == ("int", "float")
    write_table_atomic(cells, tmp_path / "out.jsonl", schema)
    assert Path(tmp_path / "out.jsonl").read_text() == ('{"path": "a", "i": 1, "f": 1.0}\n'
                                                         '{"path": "b", "i": 2, "f": 2.5}\n')
