"""Data mixtures: named sources with weights, each one or more Megatron indexed datasets.

A mixture file (YAML)::

    # paths are relative to this file
    train:
      web:          {weight: 0.15, prefixes: [web/part0, web/part1]}
      web_rewrites: {weight: 0.15, prefixes: [rewrites/all]}
      code:
        weight: 0.20
        prefixes:                      # explicit weights within a source (default: by tokens)
          - {prefix: code/raw, weight: 1}
          - {prefix: code/synthetic, weight: 3}
    valid:                             # optional: separate validation / test blends
      web: {weight: 1.0, prefixes: [web/heldout]}

A source may instead be a whole other mixture file, e.g. the pre-training mixture replayed as
"recall" data during mid-training: ``recall: {weight: 0.7, mixture: pretrain_mixture.yaml}``. Its
sources (from the same split) join this mixture as ``recall/<name>``, sharing the 0.7 in their
own proportions.

Source weights are normalised to sum to 1. Within a source, prefixes share the source's weight in
proportion to their token counts (read from the ``.idx`` files) unless weights are given.
:meth:`Mixture.blend` flattens a split into Megatron's ``(prefixes, weights)`` blend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

SPLITS = ("train", "valid", "test")


class MixtureError(ValueError):
    """A mixture file is invalid; the message names the file, the entry and the fix."""


@dataclass(frozen=True)
class DatasetRef:
    """One indexed dataset of a source (``prefix`` without ``.bin``/``.idx``)."""

    prefix: str
    weight: Optional[float] = None  # within its source; None = by tokens


@dataclass(frozen=True)
class Source:
    name: str
    weight: float
    datasets: Tuple[DatasetRef, ...]


@dataclass(frozen=True)
class Mixture:
    """A parsed mixture: for each split present, its sources."""

    path: str
    splits: Dict[str, Tuple[Source, ...]]

    def sources(self, split: str = "train") -> Tuple[Source, ...]:
        return self.splits.get(split, ())

    def source_shares(self, split: str = "train") -> Dict[str, float]:
        """Normalised weight of each source (sums to 1)."""
        sources = self.sources(split)
        total = sum(s.weight for s in sources)
        return {s.name: s.weight / total for s in sources}

    def blend(self, split: str = "train") -> Optional[Tuple[List[str], List[float]]]:
        """Megatron's flat blend ``(prefixes, weights)`` for a split, or None if it is absent."""
        sources = self.sources(split)
        if not sources:
            return None
        shares = self.source_shares(split)
        prefixes: List[str] = []
        weights: List[float] = []
        for source in sources:
            for ref, within in zip(source.datasets, within_source_weights(source)):
                prefixes.append(ref.prefix)
                weights.append(shares[source.name] * within)
        return prefixes, weights

    def dataset_sources(self, split: str = "train") -> List[str]:
        """The source name of each entry of :meth:`blend` (same order)."""
        return [s.name for s in self.sources(split) for _ in s.datasets]

    def all_prefixes(self) -> List[str]:
        return sorted({r.prefix for split in self.splits.values() for s in split for r in s.datasets})


def dataset_tokens(prefix: str) -> int:
    """Tokens in an indexed dataset, from its ``.idx`` sequence lengths."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    index = _IndexReader(prefix + ".idx", multimodal=False)
    return int(index.sequence_lengths.sum(dtype="int64"))


def dataset_documents(prefix: str) -> int:
    from megatron.core.datasets.indexed_dataset import _IndexReader

    return len(_IndexReader(prefix + ".idx", multimodal=False).document_indices) - 1


def within_source_weights(source: Source) -> List[float]:
    """Each dataset's share of its source: explicit weights if given, else by token count."""
    if all(r.weight is not None for r in source.datasets):
        raw = [float(r.weight) for r in source.datasets]
    else:
        raw = [float(dataset_tokens(r.prefix)) for r in source.datasets]
    total = sum(raw)
    if total <= 0:
        raise MixtureError(f"source '{source.name}': its datasets hold no tokens (or weights sum "
                           "to 0); remove the source or point it at non-empty datasets")
    return [w / total for w in raw]


def load_mixture(path: str, check_files: bool = True, _including: Tuple[Path, ...] = ()) -> Mixture:
    """Parse and validate a mixture file; with ``check_files``, every dataset must exist."""
    file = Path(path)
    if not file.is_file():
        where = f"{_including[-1]}: " if _including else ""
        raise MixtureError(f"{where}mixture file '{path}' does not exist; "
                           + ("fix the mixture: path" if _including else
                              "set data.mixture to a YAML mixture file (see examples/)"))
    if file.resolve() in _including:
        raise MixtureError(f"{_including[-1]}: includes {file}, which includes it back; remove "
                           "the cycle")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise MixtureError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict) or "train" not in raw:
        raise MixtureError(f"{path}: needs a top-level 'train:' mapping of sources")
    unknown = set(raw) - set(SPLITS)
    if unknown:
        raise MixtureError(f"{path}: unknown top-level key(s) {sorted(unknown)}; "
                           f"allowed: {list(SPLITS)}")
    including = (*_including, file.resolve())
    splits = {split: _parse_split(raw[split], split, file, check_files, including)
              for split in SPLITS if split in raw}
    return Mixture(path=str(file), splits=splits)


def _parse_split(raw, split: str, file: Path, check_files: bool,
                 including: Tuple[Path, ...]) -> Tuple[Source, ...]:
    where = f"{file}: {split}"
    if not isinstance(raw, dict) or not raw:
        raise MixtureError(f"{where}: must map source names to {{weight, prefixes}}")
    entries = []  # (name, weight, datasets of a source | sources of an included mixture)
    for name, entry in raw.items():
        at = f"{where}.{name}"
        if not isinstance(entry, dict) or set(entry) - {"weight", "prefixes", "mixture"}:
            raise MixtureError(f"{at}: expected keys 'weight' and either 'prefixes' or "
                               f"'mixture', got {entry!r}")
        if "prefixes" in entry and "mixture" in entry:
            raise MixtureError(f"{at}: give either 'prefixes' or 'mixture' (another mixture "
                               "file), not both")
        weight = entry.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise MixtureError(f"{at}.weight: must be a positive number, got {weight!r}")
        if "mixture" in entry:
            entries.append((str(name), float(weight),
                            _included_sources(entry["mixture"], split, at, file, check_files,
                                              including)))
        else:
            entries.append((str(name), float(weight), _parse_refs(entry, at, file, check_files)))
    total = sum(weight for _, weight, _ in entries)
    sources = []
    for name, weight, content in entries:
        if content and isinstance(content[0], Source):
            inner = sum(s.weight for s in content)
            sources += [Source(f"{name}/{s.name}", weight / total * s.weight / inner, s.datasets)
                        for s in content]
        else:
            sources.append(Source(name=name, weight=weight / total, datasets=content))
    return tuple(sources)


def _parse_refs(entry: dict, at: str, file: Path, check_files: bool) -> Tuple[DatasetRef, ...]:
    prefixes = entry.get("prefixes")
    if isinstance(prefixes, str):
        prefixes = [prefixes]
    if not isinstance(prefixes, list) or not prefixes:
        raise MixtureError(f"{at}.prefixes: must list one or more dataset prefixes (or give "
                           "'mixture: FILE' to include another mixture)")
    refs = tuple(_parse_ref(p, f"{at}.prefixes[{i}]", file, check_files)
                 for i, p in enumerate(prefixes))
    explicit = [r.weight is not None for r in refs]
    if any(explicit) and not all(explicit):
        raise MixtureError(f"{at}.prefixes: give a weight to every prefix of the source or to "
                           "none (then they are weighted by tokens)")
    return refs


def _included_sources(raw, split: str, at: str, file: Path, check_files: bool,
                      including: Tuple[Path, ...]) -> Tuple[Source, ...]:
    """The ``split`` sources of the mixture file a source entry includes."""
    if not isinstance(raw, str):
        raise MixtureError(f"{at}.mixture: must be the path of a mixture file, got {raw!r}")
    path = Path(raw) if Path(raw).is_absolute() else file.parent / raw
    sources = load_mixture(str(path), check_files, including).sources(split)
    if not sources:
        raise MixtureError(f"{at}.mixture: {path} has no '{split}:' blend to include; add one "
                           f"there or drop this source from {split}")
    return sources


def _parse_ref(raw, at: str, file: Path, check_files: bool) -> DatasetRef:
    weight = None
    if isinstance(raw, dict):
        if set(raw) - {"prefix", "weight"} or "prefix" not in raw:
            raise MixtureError(f"{at}: expected {{prefix: PATH, weight: W}}, got {raw!r}")
        weight = raw.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise MixtureError(f"{at}.weight: must be a positive number, got {weight!r}")
        raw = raw["prefix"]
    if not isinstance(raw, str):
        raise MixtureError(f"{at}: a dataset prefix must be a path string, got {raw!r}")
    prefix = raw[:-4] if raw.endswith((".bin", ".idx")) else raw
    resolved = Path(prefix) if Path(prefix).is_absolute() else file.parent / prefix
    if check_files:
        for ext in (".bin", ".idx"):
            if not Path(str(resolved) + ext).is_file():
                raise MixtureError(f"{at}: '{resolved}{ext}' does not exist; preprocess the data "
                                   "with tools/preprocess_data.py or fix the prefix")
    return DatasetRef(prefix=str(resolved), weight=None if weight is None else float(weight))


@dataclass(frozen=True)
class SourceReport:
    """One row of a mixture report (the Phi-4 report's Table 5, from real files)."""

    name: str
    share: float  # normalised weight
    unique_tokens: int  # tokens on disk, from the .idx files
    allocated_tokens: float  # share * training tokens
    epochs: float  # allocated / unique: how often the source is repeated


def mixture_report(mixture: Mixture, train_tokens: float, split: str = "train") -> List[SourceReport]:
    """Per-source shares, unique tokens, allocated tokens and epochs for a training budget."""
    shares = mixture.source_shares(split)
    rows = []
    for source in mixture.sources(split):
        unique = sum(dataset_tokens(r.prefix) for r in source.datasets)
        allocated = shares[source.name] * train_tokens
        rows.append(SourceReport(source.name, shares[source.name], unique, allocated,
                                 allocated / unique if unique else float("inf")))
    return rows


_SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_token_count(text: str) -> float:
    """``'10T'`` -> 1e13, ``'250B'`` -> 2.5e11, ``'1e9'`` -> 1e9."""
    value = text.strip().upper().replace("_", "").replace(",", "")
    try:
        if value and value[-1] in _SUFFIXES:
            return float(value[:-1]) * _SUFFIXES[value[-1]]
        return float(value)
    except ValueError:
        raise ValueError(f"'{text}' is not a token count; write e.g. 10T, 250B, 500M or 1e9") from None
