"""Curation: a workload's logged records -> eval / train / validation datasets on disk.

Second stop of the data flow (logstore -> **curate** -> students/evaluation). The steps are
upstream's (REFERENCE §2-§4), in order, each counted:

1. count checks on the raw records (upstream's messages);
2. format filter (``records.format_problem``);
3. tool-calling workloads only: keep records whose answer calls functions, parse string
   arguments as JSON;
4. dedup on the user messages, the newest copy wins;
5. minimum re-checked after filtering, and ``eval_size`` checked against what is left
   (upstream checked it against the raw count, so duplicates could leave nothing to train on);
6. seeded sample of up to ``limit`` records;

then the split: an ``eval_size`` eval set, and ``ceil(rest * val_ratio)`` validation rows,
both stratified by class (upstream never stratified validation and crashed on one-record
classes and on ``val_ratio = 0``). The split uses exact integer quotas with largest
remainders, so every class lands within one record of its exact share, and a class with at
least 3 records always keeps one in train. The same records and seed give byte-identical
files; ``manifest.json`` records counts, config, source and hashes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from findistil.artifacts import write_files_atomically
from findistil.config import DataSplitConfig
from findistil.errors import ConfigError, DataError
from findistil.progress import Progress, ProgressFn, no_progress
from findistil.records import format_problem, to_training_row, user_contents
from findistil.redact import placeholder_counts
from findistil.workloads import resolve_workload, stratum_of

CLASSIFICATION = "classification"
TOOL_CALLING = "tool_calling"
OTHERS = "others"  # stratum of the rare classes
UNKNOWN = "unknown"  # class of an answer without [[...]]
MANIFEST_FORMAT = "findistil-curated/1"


@dataclass
class CuratedData:
    """Result of one curation; ``paths`` is empty when nothing was written."""

    eval_rows: list[dict[str, Any]]
    train_rows: list[dict[str, Any]]
    val_rows: list[dict[str, Any]]
    counts: dict[str, int]
    class_counts: dict[str, dict[str, int]]
    workload_type: str
    manifest: dict[str, Any]
    paths: dict[str, Path] = field(default_factory=dict)


# ------------------------------------------------------------------------------ labels / type


def detect_workload_type(records: Sequence[dict[str, Any]]) -> str:
    """``tool_calling`` when any record offers tools or calls one, else ``classification``."""
    for record in records:
        if record.get("request", {}).get("tools"):
            return TOOL_CALLING
        choices = record.get("response", {}).get("choices") or [{}]
        if (choices[0].get("message") or {}).get("tool_calls"):
            return TOOL_CALLING
    return CLASSIFICATION


def class_of(record: dict[str, Any], workload_type: str = CLASSIFICATION) -> str:
    """A record's class as its workload reads it (``workloads``): the label of the answer,
    lower-cased, with the label set's variants folded together (tool calling: the first
    tool's name); ``unknown`` when there is none."""
    return stratum_of(record, resolve_workload(workload_type, [record]))


def _tool_record(record: dict[str, Any], parse_arguments: bool) -> dict[str, Any] | None:
    """REFERENCE §2 step 3: the record (arguments parsed) or None when it must be dropped."""
    calls = record["response"]["choices"][0]["message"].get("tool_calls")
    if not isinstance(calls, list) or not calls:
        return None
    if not all(isinstance(c, dict) and c.get("type") == "function" for c in calls):
        return None
    if not parse_arguments:
        return record
    record = copy.deepcopy(record)
    for call in record["response"]["choices"][0]["message"]["tool_calls"]:
        fn = call.get("function")
        if not isinstance(fn, dict):
            return None
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except json.JSONDecodeError:
                return None
    return record


# ------------------------------------------------------------------------------------ split


def _allocate(sizes: dict[str, int], k: int, keep: Callable[[int], int]) -> dict[str, int]:
    """Split ``k`` picks over strata of ``sizes`` by exact share (integer largest remainders).

    ``keep(size)`` records a stratum should keep back (so train keeps every class); that
    reserve is only given up when ``k`` cannot be met otherwise.
    """
    total = sum(sizes.values())
    floor = {c: k * s // total for c, s in sizes.items()}
    remainder = {c: k * s % total for c, s in sizes.items()}
    cap = {c: max(0, s - keep(s)) for c, s in sizes.items()}
    take = {c: min(floor[c], cap[c]) for c in sizes}
    left = k - sum(take.values())
    order = sorted(sizes, key=lambda c: (-remainder[c], -sizes[c], c))
    for c in order:  # round up the largest remainders (each stays within +1 of its share)
        if left and remainder[c] and take[c] < cap[c]:
            take[c] += 1
            left -= 1
    for limit in (cap, sizes):  # only when caps bit: fill wherever room is left
        for c in sorted(sizes, key=lambda c: (-(limit[c] - take[c]), c)):
            extra = min(left, limit[c] - take[c])
            take[c] += extra
            left -= extra
    return take


def _pick(
    indices: list[int], strata: list[str], k: int, stratify: bool, keep, rng: random.Random
) -> set[int]:
    """``k`` of ``indices``: stratified by ``strata`` when asked and possible, else random."""
    if k <= 0:
        return set()
    groups: dict[str, list[int]] = defaultdict(list)
    for i in indices:
        groups[strata[i]].append(i)
    if not stratify or k < len(groups):
        return set(rng.sample(indices, k))
    take = _allocate({c: len(g) for c, g in groups.items()}, k, keep)
    picked: set[int] = set()
    for c in sorted(groups):
        members = groups[c]
        rng.shuffle(members)
        picked.update(members[: take[c]])
    return picked


def val_size(rest: int, val_ratio: float) -> int:
    """``ceil(rest * val_ratio)`` without float noise (100 * 0.07 is 7, not 8)."""
    exact = round(rest * val_ratio, 9)
    n = int(exact) + (exact > int(exact))
    return min(n, max(rest - 1, 0))  # always leave a record to train on


def split_indices(
    labels: list[str], split: DataSplitConfig
) -> tuple[list[int], list[int], list[int]]:
    """Eval, train and validation indices into ``labels`` (each list in a seeded order)."""
    counts = Counter(labels)
    rare = max(split.rare_class_threshold, split.min_samples_per_class - 1)
    strata = [OTHERS if counts[label] <= rare else label for label in labels]
    rng = random.Random(f"{split.random_seed}:split")
    everything = list(range(len(labels)))
    eval_set = _pick(
        everything,
        strata,
        split.eval_size,
        split.stratify_enabled,
        lambda s: 1 if s >= 2 else 0,
        rng,
    )
    rest = [i for i in everything if i not in eval_set]
    val_set = _pick(
        rest,
        strata,
        val_size(len(rest), split.val_ratio),
        split.stratify_enabled,
        lambda s: 1,
        rng,
    )
    train = [i for i in rest if i not in val_set]
    out = [sorted(eval_set), train, sorted(val_set)]
    for part in out:
        rng.shuffle(part)
    return out[0], out[1], out[2]


# -------------------------------------------------------------------------------- curation


def _check_raw_counts(n: int, split: DataSplitConfig) -> None:
    # Upstream's messages, word for word, with what to do appended.
    if n < split.min_total_records:
        raise DataError(
            "Not enough records found for the given workload. "
            f"A minimum of {split.min_total_records} records is required, "
            f"but only {n} were found. Load more records (findistil logs load) or lower "
            "data_split_config.min_total_records."
        )
    if split.limit is not None and split.limit < split.min_total_records:
        raise ConfigError(
            "limit cannot be less than the minimum number of records. "
            f"limit is {split.limit}, but the minimum number of records is "
            f"{split.min_total_records}."
        )


_STEPS = 6


def curate_records(
    records: list[dict[str, Any]],
    split: DataSplitConfig,
    *,
    workload_type: str = "auto",
    out_dir: Path | None = None,
    source: dict[str, Any] | None = None,
    progress: ProgressFn = no_progress,
) -> CuratedData:
    """Curate records (newest first) into eval/train/val sets; write them when ``out_dir``.

    A ``random_seed`` of null draws one here; the manifest records the seed used.
    Example: ``curate_records(recs, DataSplitConfig(eval_size=5), out_dir=Path("ds")).counts``.

    Raises:
        DataError: too few records (before or after filtering), eval_size too large.
    """
    if workload_type not in ("auto", CLASSIFICATION, TOOL_CALLING):
        raise ConfigError(
            f"evaluation_config.workload_type: {workload_type!r} is not one of "
            "classification, tool_calling, auto"
        )
    split = split.with_seed()
    counts: dict[str, int] = {"total": len(records)}
    _check_raw_counts(len(records), split)
    progress(Progress("curate", 1, _STEPS, dict(counts)))
    unique, workload_type = _clean(records, split, workload_type, counts, progress)
    selected = _select(unique, split, counts)
    progress(Progress("curate", 5, _STEPS, dict(counts)))

    workload = resolve_workload(workload_type, selected)  # the label set of all answers
    labels = [stratum_of(r, workload) for r in selected]
    eval_ix, train_ix, val_ix = split_indices(labels, split)
    eval_rows = [selected[i] for i in eval_ix]
    train_rows = [to_training_row(selected[i]) for i in train_ix]
    val_rows = [to_training_row(selected[i]) for i in val_ix]
    counts.update(eval=len(eval_rows), train=len(train_rows), val=len(val_rows))
    parts = {"selected": range(len(labels)), "eval": eval_ix, "train": train_ix, "val": val_ix}
    class_counts = {
        name: dict(sorted(Counter(labels[i] for i in ix).items())) for name, ix in parts.items()
    }
    texts = {name: _jsonl(rows) for name, rows in _splits(eval_rows, train_rows, val_rows)}
    manifest = _manifest(texts, selected, split, workload_type, source, counts, class_counts)
    paths: dict[str, Path] = {}
    if out_dir is not None:
        paths = write_datasets(Path(out_dir), texts, manifest)
    progress(Progress("curate", _STEPS, _STEPS, dict(counts)))
    return CuratedData(
        eval_rows, train_rows, val_rows, counts, class_counts, workload_type, manifest, paths
    )


def _clean(
    records: list[dict[str, Any]],
    split: DataSplitConfig,
    workload_type: str,
    counts: dict[str, int],
    progress: ProgressFn,
) -> tuple[list[dict[str, Any]], str]:
    """Format filter, tool-call filter and dedup (steps 2-4), each counted in ``counts``.

    Returns the unique records (newest copy kept) and the resolved workload type.
    """
    valid = [r for r in records if format_problem(r) is None]
    counts["invalid_format"] = len(records) - len(valid)
    if workload_type == "auto":
        workload_type = detect_workload_type(valid)
    progress(Progress("curate", 2, _STEPS, dict(counts)))

    filtered = valid
    if workload_type == TOOL_CALLING:
        kept = (_tool_record(r, split.parse_function_arguments) for r in valid)
        filtered = [r for r in kept if r is not None]
    counts["quality_filtered"] = len(valid) - len(filtered)
    progress(Progress("curate", 3, _STEPS, dict(counts)))

    seen: set[tuple[str, ...]] = set()
    unique = []
    for record in filtered:  # newest first, so the newest copy wins
        key = user_contents(record)
        if key not in seen:
            seen.add(key)
            unique.append(record)
    counts["duplicates"] = len(filtered) - len(unique)
    progress(Progress("curate", 4, _STEPS, dict(counts)))
    if len(unique) < split.min_total_records:
        raise DataError(
            f"Insufficient valid records. Found {len(unique)} but need "
            f"{split.min_total_records}. Total records: {len(records)}, valid OpenAI format: "
            f"{len(valid)}, after quality filters: {len(filtered)}. "
            "Please provide more valid records."
        )
    return unique, workload_type


def _select(
    unique: list[dict[str, Any]], split: DataSplitConfig, counts: dict[str, int]
) -> list[dict[str, Any]]:
    """The seeded sample of up to ``limit`` records (step 6), checked against ``eval_size``."""
    selected = unique
    if split.limit is not None and len(unique) > split.limit:
        rng = random.Random(f"{split.random_seed}:sample")
        selected = [unique[i] for i in sorted(rng.sample(range(len(unique)), split.limit))]
    if split.eval_size >= len(selected):
        limited = f", limit {split.limit}" if len(selected) < len(unique) else ""
        raise DataError(
            "eval_size cannot be larger than the total number of records. "
            f"eval_size is {split.eval_size}, but only {len(selected)} records remain after "
            f"format filtering and deduplication ({counts['total']} found{limited}); lower "
            "data_split_config.eval_size so that records are left to train on."
        )
    counts["selected"] = len(selected)
    return selected


def _manifest(
    texts: dict[str, str],
    selected: list[dict[str, Any]],
    split: DataSplitConfig,
    workload_type: str,
    source: dict[str, Any] | None,
    counts: dict[str, int],
    class_counts: dict[str, dict[str, int]],
) -> dict[str, Any]:
    """What the datasets hold and where they came from, with a hash per file."""
    hashes = {name: hashlib.sha256(t.encode()).hexdigest() for name, t in texts.items()}
    timestamps = [r.get("timestamp") for r in selected if isinstance(r.get("timestamp"), int)]
    return {
        "format": MANIFEST_FORMAT,
        "workload_type": workload_type,
        "source": source or {},
        "seed": split.random_seed,
        "config": split.model_dump(mode="json"),
        "counts": counts,
        "class_counts": class_counts,
        "timestamps": {
            "newest": max(timestamps, default=None),
            "oldest": min(timestamps, default=None),
        },
        "files": {name: {"path": FILES[name], "sha256": hashes[name]} for name in texts},
        "redacted_pii": placeholder_counts(list(texts.values())),
        "content_sha256": hashlib.sha256("".join(hashes.values()).encode()).hexdigest(),
    }


FILES = {
    "eval": "eval_data.jsonl",
    "train": "training/train_data.jsonl",
    "val": "validation/val_data.jsonl",
    "manifest": "manifest.json",
}


def _splits(eval_rows, train_rows, val_rows):
    return (("eval", eval_rows), ("train", train_rows), ("val", val_rows))


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_datasets(out_dir: Path, texts: dict[str, str], manifest: dict[str, Any]) -> dict:
    """Write the upstream-named files and the manifest; returns name -> path."""
    paths = {name: out_dir / rel for name, rel in FILES.items()}
    files = {paths[name]: text for name, text in texts.items()}
    files[paths["manifest"]] = json.dumps(manifest, indent=2) + "\n"
    write_files_atomically(files)
    return paths


def curate_workload(
    store,
    workload_id: str,
    client_id: str,
    split: DataSplitConfig,
    *,
    out_dir: Path | None = None,
    workload_type: str = "auto",
    progress: ProgressFn = no_progress,
) -> CuratedData:
    """Curate the stored records of one workload/client (read newest first).

    Example: ``curate_workload(store, "news_classifier", "demo", cfg, out_dir=Path("ds"))``.
    """
    records = list(store.iter_records(workload_id, client_id))
    return curate_records(
        records,
        split,
        workload_type=workload_type,
        out_dir=out_dir,
        source={"workload_id": workload_id, "client_id": client_id, "records": len(records)},
        progress=progress,
    )
