"""Filters on streamed (`IterableDataset`) splits that keep their rows Arrow.

A `filter` on Python rows hands the rows on as Python lists, which `with_format("numpy")` then converts value by
value: a MIMIC-IV-ECG record took 40x longer to read, and its signal came back float64. `filter_stream` filters the
Arrow batches instead, where the stream still has them.
"""

from __future__ import annotations

import pyarrow as pa
from datasets import IterableDataset


def filter_stream(part: IterableDataset, keep, with_indices: bool = False) -> IterableDataset:
    """`part` with the rows for which `keep(batch)` (or `keep(batch, indices)`) is true, `part`'s format kept; `keep`
    reads a column as a list with `column_values(batch, name)`. The batches are Arrow tables where the stream still has
    them, so the rows after the filter stay Arrow; this is a `map` that returns fewer rows, since two Arrow `filter`s
    in a row fail in datasets 5.2 (their mask columns clash). After a Python step (PTB-XL's version filter) the rows
    are Python: an Arrow batch of them takes its types from their values (an empty label list as `list<null>`) and
    cannot be joined to the next one, so they are filtered as Python batches."""
    if part._ex_iterable.iter_arrow is None:
        return part.filter(keep, with_indices=with_indices, batched=True)
    format_type = part._formatting.format_type if part._formatting is not None else None

    def kept(table: pa.Table, *indices) -> pa.Table:
        return table.filter(pa.array(keep(table, *indices), type=pa.bool_()))

    arrow = part.with_format("arrow")
    return arrow.map(kept, with_indices=with_indices, batched=True, features=part.features).with_format(format_type)


def column_values(batch, name: str) -> list:
    """Column `name` of a batch `filter_stream` hands to `keep` (an Arrow table or a dict of lists) as a list."""
    values = batch[name]
    return values.to_pylist() if hasattr(values, "to_pylist") else list(values)


__all__ = ["column_values", "filter_stream"]
