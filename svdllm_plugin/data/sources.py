"""Where text comes from: the embedded default, a user file (.txt, .jsonl, .json), or a hub dataset.

A user file is split 90% / 10% into "calibration" and "evaluation"; any other name is a hub
dataset (its train / test splits).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets

from svdllm_plugin.data import embedded
from svdllm_plugin.data.embedded import EMBEDDED, check_split, read_text

__all__ = ["load_text", "HUB_ALIASES", "HUB_SPLITS"]

HUB_ALIASES = {"wikitext2": ("wikitext", "wikitext-2-raw-v1")}
HUB_SPLITS = {"calibration": "train", "evaluation": "test"}
_FILE_SUFFIXES = (".txt", ".jsonl", ".json")


def _check_not_empty(text: str, what: str) -> str:
    if not text.strip():
        raise ValueError(f"{what} is empty; give a file or dataset with text in it")
    return text


def _is_path_like(dataset: str) -> bool:
    # hub ids look like "org/name": one "/" alone does not make a path (same rule as --model)
    return (
        dataset.lower().endswith(_FILE_SUFFIXES)
        or dataset.startswith((".", "/", "~"))
        or dataset.count("/") > 1
        or (os.sep != "/" and os.sep in dataset)
    )


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}, line {lineno}, column {e.pos + 1}: not valid JSON ({e.msg}); "
                    'each line must be a JSON object like {"text": "..."}'
                ) from e
            texts.append(_record_text(record, f"{path}, line {lineno}"))
    return texts


def _json_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg}); "
                'give a JSON list like [{"text": "..."}]'
            ) from e
    if not isinstance(records, list):
        raise ValueError(
            f'{path}: expected a JSON list of {{"text": "..."}} objects; got a {type(records).__name__}'
        )
    return [_record_text(r, f"{path}, item {i}") for i, r in enumerate(records)]


def _record_text(record, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and "text" in record and not isinstance(record["text"], str):
        value = record["text"]
        raise ValueError(
            f'{where}: "text" is {json.dumps(value)[:40]} ({type(value).__name__}), not a string; '
            'each record must look like {"text": "..."}'
        )
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f'{where}: has no "text" field; each record must look like {{"text": "..."}}')
    return record["text"]


def _read_user_file(path: Path) -> str:
    if path.is_dir():
        raise ValueError(f"dataset {path} is a folder; give a .txt, .jsonl or .json file")
    suffix = path.suffix.lower()
    readers = {
        ".jsonl": lambda: "\n\n".join(_jsonl_texts(path)),
        ".json": lambda: "\n\n".join(_json_texts(path)),
        ".txt": lambda: read_text(path),
    }
    if suffix not in readers:
        raise ValueError(
            f"dataset file {path} has an unsupported type {suffix!r}; give a .txt, .jsonl or .json file"
        )
    try:
        text = readers[suffix]()
    except UnicodeDecodeError as e:
        raise ValueError(
            f"dataset file {path} is not UTF-8 text (byte {e.start}: {e.reason}); give a UTF-8 text file"
        ) from e
    except PermissionError as e:
        raise PermissionError(f"dataset file {path} cannot be read (permission denied); fix its mode") from e
    if "\x00" in text:
        raise ValueError(
            f"dataset file {path} contains NUL bytes ({text.count(chr(0)):,}), so it is binary, not text; "
            "give a UTF-8 text file"
        )
    return text


def _split_point(text: str, fraction: float = 0.9) -> tuple[int, int]:
    """(end of the first part, start of the second), at a paragraph or line break near ``fraction``."""
    cut = int(len(text) * fraction)
    window = max(1, len(text) // 20)  # look for a break within 5% of the text either side
    for sep in ("\n\n", "\n"):
        before = text.rfind(sep, max(1, cut - window), cut + len(sep))  # last break starting <= cut
        after = text.find(sep, cut, cut + window + len(sep))  # first break starting >= cut
        found = [i for i in (before, after) if i > 0 and i + len(sep) < len(text)]
        if found:
            i = min(found, key=lambda i: abs(i - cut))
            return i, i + len(sep)
    return cut, cut


def _split_user_text(text: str, split: str) -> str:
    end, start = _split_point(text)
    return text[:end] if split == "calibration" else text[start:]


def _load_hub(dataset: str, split: str) -> str:
    name, config = HUB_ALIASES.get(dataset, (dataset, None))
    if config is None and ":" in name:  # "name:config" picks a configuration
        name, config = name.split(":", 1)
    hub_split = HUB_SPLITS[split]
    if not datasets.config.HF_DATASETS_OFFLINE:
        from svdllm_plugin.models import hub_unreachable

        problem = hub_unreachable()  # seconds, instead of a minute of retries inside load_dataset
        if problem:
            raise ConnectionError(
                f"dataset {dataset!r} is not a local file and {problem}; "
                f"pass a local .txt/.jsonl file or {EMBEDDED!r}, or check the network"
            )
    try:
        data = datasets.load_dataset(name, config, split=hub_split)
    except Exception as e:
        raise RuntimeError(
            f"could not load dataset {dataset!r} (split {hub_split!r}) from the hub: {e}; "
            f"pass a local .txt/.jsonl file or {EMBEDDED!r}"
        ) from e
    if "text" not in data.column_names:
        raise ValueError(f"dataset {dataset!r} has no 'text' column (columns: {data.column_names})")
    return "\n\n".join(data["text"])


def load_text(dataset: str | None, split: str) -> str:
    """The text of ``split`` from ``dataset``: None/"embedded", a .txt/.jsonl/.json file, or a hub name.

    A user file gives its first ~90% to "calibration" and the rest to "evaluation".
    """
    check_split(split)
    if dataset is None or dataset == EMBEDDED:
        return embedded.embedded_text(split)
    path = Path(dataset).expanduser()
    if path.exists():
        text = _check_not_empty(_read_user_file(path), f"dataset file {path}")
        return _check_not_empty(_split_user_text(text, split), f"the {split} part of {path}")
    if _is_path_like(dataset):
        raise FileNotFoundError(
            f"dataset file {dataset!r} does not exist; give an existing .txt/.jsonl/.json file, "
            f"or {EMBEDDED!r} for the built-in text"
        )
    return _check_not_empty(_load_hub(dataset, split), f"the {split} split of dataset {dataset!r}")
