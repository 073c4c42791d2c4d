"""PTB-XL SCP-ECG statements -> the label sets `superclass`, `subclass`, `form`, `rhythm`, `all`.

The 71 statements and their categories come from PTB-XL's `scp_statements.csv` (Wagner et al. 2020):

- `superclass`: the 5 diagnostic classes (`diagnostic_class`: CD, HYP, MI, NORM, STTC);
- `subclass`: the 23 diagnostic subclasses (`diagnostic_subclass`);
- `form`: the 19 form statements (`form == 1`; 4 of them are also diagnostic);
- `rhythm`: the 12 rhythm statements (`rhythm == 1`);
- `all`: all 71 statements.

Class names are sorted alphabetically, so class indices depend only on `scp_statements.csv`.

Likelihood threshold: PTB-XL gives each diagnostic statement a likelihood (0, 15, 35, 50, 80 or 100 %); form and
rhythm statements carry 0 or 100 nearly always, and their value is not used (in the 500 records of the shared
subset: 574 times 0, 27 times 100; in the full v1.0.1 table of the non-diagnostic statements 28,814 times 0, 1,509
times 100, twice 50 and once 80). A diagnostic statement (`diagnostic == 1`) counts only if its likelihood is
`>= label_threshold` (a percentage in [0, 100]; anything else raises); other statements always count, whatever value
they carry. The default 0 keeps every statement, as the PTB-XL benchmark does (Strodthoff et al. 2021, "Deep learning
for ECG analysis: benchmarks and insights from PTB-XL"), so a record with `{"NORM": 80.0, "SBRAD": 0.0}` is
NORM + SBRAD.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LABEL_SETS = ("superclass", "subclass", "form", "rhythm", "all")
DEFAULT_LABEL_THRESHOLD = 0.0


class ScpCodeError(ValueError):
    """An SCP code that `scp_statements.csv` does not define, or an unreadable `scp_codes` field."""


def check_label_threshold(threshold: float) -> float:
    """`threshold` as a float when it is a likelihood in [0, 100] (PTB-XL's percentages); a `ValueError` naming
    `label_threshold` otherwise (above 100 no diagnostic statement would count, and no record would say why)."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(threshold, bool) or not 0.0 <= value <= 100.0:
        raise ValueError(f"label_threshold: must be a likelihood in [0, 100] (%), got {threshold!r}")
    return value


@dataclass(frozen=True)
class ScpStatement:
    code: str
    description: str
    diagnostic: bool
    form: bool
    rhythm: bool
    diagnostic_class: str | None
    diagnostic_subclass: str | None


class ScpStatements:
    """The statements of `scp_statements.csv` and the label sets built from them.

    Example:

    ```python
    >>> statements = ScpStatements.from_csv("data/ptbxl_sample/scp_statements.csv")
    >>> statements.labels({"NORM": 100.0, "LVOLT": 0.0, "SR": 0.0})["superclass"]
    ['NORM']
    ```"""

    def __init__(self, statements: Iterable[ScpStatement], source: str = "scp_statements.csv"):
        self.statements = {statement.code: statement for statement in statements}
        self.source = source
        self.names = {
            "superclass": sorted({s.diagnostic_class for s in self.statements.values() if s.diagnostic_class}),
            "subclass": sorted({s.diagnostic_subclass for s in self.statements.values() if s.diagnostic_subclass}),
            "form": sorted(s.code for s in self.statements.values() if s.form),
            "rhythm": sorted(s.code for s in self.statements.values() if s.rhythm),
            "all": sorted(self.statements),
        }

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> ScpStatements:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: scp_statements.csv not found")
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        required = {"", "description", "diagnostic", "form", "rhythm", "diagnostic_class", "diagnostic_subclass"}
        if not rows or not required <= set(rows[0]):
            raise ValueError(f"{path}: expected columns {sorted(required)} (the PTB-XL scp_statements.csv)")
        return cls((_statement(row) for row in rows), source=str(path))

    def __len__(self) -> int:
        return len(self.statements)

    def labels(
        self, scp_codes: Mapping[str, float], threshold: float = DEFAULT_LABEL_THRESHOLD, record: str = "record"
    ) -> dict[str, list[str]]:
        """The class names of every label set for one record's `scp_codes` (`{code: likelihood}`); a diagnostic
        statement counts when its likelihood is `>= threshold` (in [0, 100], else `ValueError`)."""
        threshold = check_label_threshold(threshold)
        unknown = sorted(set(scp_codes) - set(self.statements))
        if unknown:
            raise ScpCodeError(f"{record}: unknown SCP code(s) {unknown}, not in {self.source}")
        kept = [
            self.statements[code]
            for code, likelihood in scp_codes.items()
            if not self.statements[code].diagnostic or float(likelihood) >= threshold
        ]
        return {
            "superclass": sorted({s.diagnostic_class for s in kept if s.diagnostic_class}),
            "subclass": sorted({s.diagnostic_subclass for s in kept if s.diagnostic_subclass}),
            "form": sorted(s.code for s in kept if s.form),
            "rhythm": sorted(s.code for s in kept if s.rhythm),
            "all": sorted(s.code for s in kept),
        }


def _statement(row: dict[str, str]) -> ScpStatement:
    def flag(value: str) -> bool:
        return value.strip() not in ("", "0", "0.0")

    return ScpStatement(
        code=row[""].strip(),
        description=row["description"].strip(),
        diagnostic=flag(row["diagnostic"]),
        form=flag(row["form"]),
        rhythm=flag(row["rhythm"]),
        diagnostic_class=row["diagnostic_class"].strip() or None,
        diagnostic_subclass=row["diagnostic_subclass"].strip() or None,
    )


def parse_scp_codes(text: str, record: str = "record") -> dict[str, float]:
    """PTB-XL's `scp_codes` field (a Python dict literal, e.g. `"{'NORM': 100.0, 'SR': 0.0}"`) or its JSON form.

    Raises `ScpCodeError` naming `record` for an empty or unreadable cell, a value that is not a dict, and a likelihood
    that is not a number in [0, 100] (PTB-XL's likelihoods are percentages; 0 means unknown)."""
    if not isinstance(text, str) or not text.strip():
        raise ScpCodeError(f"{record}: scp_codes is empty ({text!r}); every PTB-XL record has at least one statement")
    try:
        value = json.loads(text) if text.lstrip().startswith('{"') else ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as error:
        raise ScpCodeError(f"{record}: unreadable scp_codes {text!r} ({error})") from error
    if not isinstance(value, dict):
        raise ScpCodeError(f"{record}: scp_codes {text!r} is not a dict of code -> likelihood")
    codes = {}
    for code, likelihood in value.items():
        try:
            number = float(likelihood)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(likelihood, bool) or not 0.0 <= number <= 100.0:
            raise ScpCodeError(
                f"{record}: scp_codes {text!r} gives {code!r} the likelihood {likelihood!r}, not a number in [0, 100]"
            )
        codes[str(code)] = number
    return codes


def multi_hot(label_indices: Iterable[int] | Iterable[Iterable[int]], num_classes: int) -> np.ndarray:
    """Class indices -> a float32 multi-hot vector `(num_classes,)`, or `(batch, num_classes)` for a list of lists.

    Example:

    ```python
    >>> multi_hot([3], 5)
    array([0., 0., 0., 1., 0.], dtype=float32)
    ```"""
    items = list(label_indices)
    if items and not np.isscalar(items[0]):
        return np.stack([multi_hot(row, num_classes) for row in items])
    vector = np.zeros(num_classes, dtype=np.float32)
    for index in items:
        if not 0 <= int(index) < num_classes:
            raise ValueError(f"label index {index} is outside [0, {num_classes})")
        vector[int(index)] = 1.0
    return vector


def label_names(dataset_or_features, label_set: str) -> list[str]:
    """The class names of `label_set` stored in a dataset's (or `Features`') `List(ClassLabel)` column: a PTB-XL
    label set (`LABEL_SETS`) or a label column of a converted WFDB folder."""
    features = getattr(dataset_or_features, "features", dataset_or_features)
    if isinstance(features, Mapping) and "train" in features and hasattr(features["train"], "features"):
        features = features["train"].features  # a DatasetDict
    if label_set not in features:
        raise KeyError(f"no {label_set!r} label column; the dataset has {sorted(features)}")
    feature = features[label_set]
    class_label = getattr(feature, "feature", feature)
    if not hasattr(class_label, "names"):
        raise TypeError(f"column {label_set!r} is {feature}, not a List(ClassLabel)")
    return list(class_label.names)


__all__ = [
    "DEFAULT_LABEL_THRESHOLD",
    "LABEL_SETS",
    "ScpCodeError",
    "ScpStatement",
    "ScpStatements",
    "check_label_threshold",
    "label_names",
    "multi_hot",
    "parse_scp_codes",
]
