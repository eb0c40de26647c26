"""The registry writes a version's Parquet file and hashes its rows a slice at a time, to keep the peak memory of a
large import near the size of its rows. The file and the hash must be what writing and hashing them whole gave."""

import json
from hashlib import sha256

import pyarrow.parquet as pq
import pytest

from align.registry.registry import _content_hash, _write_parquet


def whole_hash(kind: str, rows: list[dict]) -> str:
    """The formula every existing version's content_hash was computed with."""
    payload = json.dumps({"kind": kind, "rows": rows}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return sha256(payload.encode("utf-8")).hexdigest()


def pair(n: int, **extra) -> dict:
    return {
        "prompt": [{"role": "user", "content": f'q{n} caf\u00e9 \u2028 \U0001f600 "quoted"'}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": ""}],
        **extra,
    }


@pytest.mark.parametrize("rows", [[pair(1)], [pair(1), pair(2, margin=1.5, tie=False)], [pair(n) for n in range(50)]])
def test_the_content_hash_is_unchanged(rows):
    assert _content_hash("preference", rows) == whole_hash("preference", rows)


def test_many_rows_are_written_in_slices_and_read_back_whole(tmp_path):
    rows = [pair(n, weight=float(n)) for n in range(25_000)]
    target = tmp_path / "datasets" / "p" / "1.parquet"
    _write_parquet("preference", rows, target)
    assert pq.ParquetFile(target).metadata.num_row_groups == 3
    assert pq.read_table(target).to_pylist() == rows
    assert sorted(p.name for p in target.parent.iterdir()) == ["1.parquet"]


def test_a_failed_write_leaves_no_file(tmp_path):
    import pyarrow as pa

    target = tmp_path / "datasets" / "p" / "1.parquet"
    rows = [pair(n) for n in range(10_001)] + [pair(0, margin="not a number")]  # fails in the second slice
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        _write_parquet("preference", rows, target)
    assert list(target.parent.iterdir()) == []
