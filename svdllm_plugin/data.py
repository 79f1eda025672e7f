"""Text for calibration and evaluation, and its cutting into token windows.

The default text ("embedded") needs no download: it is the docstrings of the Python standard
library, read with ``ast`` (nothing is imported). Modules are dealt into two splits, every
10th module to "evaluation", so held-out text comes from modules calibration never saw.
A user file (.txt, .jsonl, .json) is split 90% / 10%; any other name is a hub dataset.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import datasets
import torch
from loguru import logger

from svdllm_plugin.models import cache_dir

__all__ = [
    "EMBEDDED",
    "embedded_text",
    "load_text",
    "calibration_dataset",
    "eval_windows",
    "other_domain_text",
    "spread_windows",
    "HELD_OUT_SPLITS",
    "held_out_splits",
    "spread_splits",
]

EMBEDDED = "embedded"
SPLITS = ("calibration", "evaluation")
HUB_ALIASES = {"wikitext2": ("wikitext", "wikitext-2-raw-v1")}
HUB_SPLITS = {"calibration": "train", "evaluation": "test"}

_FORMAT = "v2"  # bump when the extraction below changes, so old caches are not reused
_EVAL_EVERY = 10  # every 10th module (in sorted order) is held out for evaluation
_MIN_DOC_CHARS = 40
_SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "venv",
    "__phello__",
    "__pycache__",
    "lib-dynload",
    "pydoc_data",
    "encodings",  # encodings: hundreds of generated, near-identical codecs
}
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_FILE_SUFFIXES = (".txt", ".jsonl", ".json")
_TOKENIZE_CHUNK_CHARS = 64_000


# ---------------------------------------------------------------- embedded text


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-")]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _definitions(node: ast.AST):
    """Classes and functions under ``node``, in source order, also inside if/try/with/match blocks.

    Only statement bodies are visited, not expressions: far fewer nodes than ``ast.walk``,
    and the only places a docstring can hang from.
    """
    for field in ("body", "orelse", "handlers", "finalbody", "cases"):
        children = getattr(node, field, None)
        for child in children if isinstance(children, list) else ():
            if isinstance(child, _DOC_NODES):
                yield child
            yield from _definitions(child)


def _module_docstrings(path: Path) -> list[str]:
    """Docstrings of a module, its classes and functions, in source order."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return []
    docs = []
    for node in [tree, *_definitions(tree)]:
        doc = ast.get_docstring(node)
        if doc is None or len(doc) < _MIN_DOC_CHARS:
            continue
        try:
            doc.encode("utf-8")  # a lone surrogate (from a "\ud800" escape) cannot be cached
        except UnicodeEncodeError:
            continue
        docs.append(doc)
    return docs


def _build_embedded() -> dict[str, str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()  # a docstring repeated across modules would leak between splits
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    modules = {s: 0 for s in SPLITS}
    for path in _stdlib_files(root):
        docs = [d for d in _module_docstrings(path) if d not in seen]
        if not docs:
            continue
        seen.update(docs)
        split = "evaluation" if sum(modules.values()) % _EVAL_EVERY == _EVAL_EVERY - 1 else "calibration"
        modules[split] += 1
        parts[split] += docs
    texts = {s: "\n\n".join(parts[s]) for s in SPLITS}
    for s in SPLITS:
        logger.info("Embedded text, {}: {} modules of {}, {:,} chars", s, modules[s], root, len(texts[s]))
    return texts


def _embedded_path(split: str) -> Path:
    stdlib = sysconfig.get_paths()["stdlib"]
    tag = hashlib.sha1(stdlib.encode()).hexdigest()[:8]  # two installs of one version may differ
    version = "{}{}.{}.{}".format(sys.implementation.name, *sys.version_info[:3])
    return cache_dir() / "text" / f"stdlib-docstrings-{_FORMAT}-{version}-{tag}-{split}.txt"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a cache can be read by all
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def embedded_text(split: str) -> str:
    """The stdlib-docstring text of ``split`` ("calibration" or "evaluation"), cached on disk."""
    _check_split(split)
    path = _embedded_path(split)
    if path.exists():
        return _read(path)
    start = time.perf_counter()
    texts = _build_embedded()
    for s, text in texts.items():
        _write_atomic(_embedded_path(s), text)
    logger.info("Built the embedded text in {:.1f} s; cached in {}", time.perf_counter() - start, path.parent)
    return texts[split]


def _read(path: Path) -> str:
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


# ---------------------------------------------------------------- user files and hub datasets


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
        ".txt": lambda: _read(path),
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
    _check_split(split)
    if dataset is None or dataset == EMBEDDED:
        return embedded_text(split)
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


# ---------------------------------------------------------------- token windows


def _chunks(text: str, size: int = _TOKENIZE_CHUNK_CHARS) -> list[str]:
    """Pieces of about ``size`` chars, each cut just before a paragraph break.

    A fast tokenizer encodes a batch of pieces in parallel, and no single call sees a
    sequence far over the model's maximum length.
    """
    chunks, start = [], 0
    while len(text) - start > size:
        cut = text.find("\n\n", start + size)
        if cut < 0:
            break
        chunks.append(text[start:cut])
        start = cut
    chunks.append(text[start:])
    return chunks


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` (no special tokens), as one 1-D LongTensor."""
    if not text:
        return torch.empty(0, dtype=torch.long)
    # verbose=False: the "sequence length is longer than the specified maximum" warning is
    # expected here, the windows are cut afterwards
    encoded = tokenizer(_chunks(text), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor([i for ids in encoded for i in ids], dtype=torch.long)


def _check_at_least(value: int, minimum: int, name: str, option: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{name}` ({option}) must be an integer >= {minimum}; got {value!r}")


def calibration_dataset(
    tokenizer, text: str, num_samples: int, seq_len: int, seed: int = 0
) -> datasets.Dataset:
    """``num_samples`` windows of ``seq_len`` tokens at seeded random offsets of ``text``.

    Columns ``input_ids`` and ``attention_mask`` (all ones: no padding), ready for
    ``llmcompressor.oneshot(dataset=...)``.
    """
    _check_at_least(num_samples, 1, "num_samples", "--num-samples")
    _check_at_least(seq_len, 2, "seq_len", "--seq-len")
    ids = _tokenize(tokenizer, text)  # (N,)
    n = ids.numel()
    if n < seq_len + 1:
        raise ValueError(
            f"the calibration text has {n} tokens, fewer than --seq-len + 1 = {seq_len + 1}; "
            "give more text or a smaller --seq-len"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seq_len + 1, (num_samples,), generator=generator)
    windows = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])  # (num_samples, seq_len)
    logger.info("Calibration: {} windows of {} tokens from {:,} tokens", num_samples, seq_len, n)
    return datasets.Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )


def eval_windows(
    tokenizer, text: str, seq_len: int, max_windows: int | None = None, option: str = "--max-windows"
) -> torch.Tensor:
    """Consecutive non-overlapping windows from the start of ``text``: LongTensor (W, seq_len).

    ``option`` names ``max_windows`` in error messages (``svdllm compress`` calls it --eval-windows).
    """
    _check_at_least(seq_len, 2, "seq_len", "--seq-len")
    if max_windows is not None:
        _check_at_least(max_windows, 1, "max_windows", option)
    ids = _tokenize(tokenizer, text)
    W = ids.numel() // seq_len
    if W < 1:
        raise ValueError(
            f"the evaluation text has {ids.numel()} tokens, fewer than one window of --seq-len {seq_len}; "
            "give more text or a smaller --seq-len"
        )
    if max_windows is not None:
        W = min(W, max_windows)
    return ids[: W * seq_len].view(W, seq_len)


def other_domain_text() -> str:
    """English legal prose: the license files of the installed packages (site-packages'
    ``*.dist-info/**/LICEN*``), de-duplicated by content, in path order. Another domain than the
    docstring calibration text, present offline on every machine the plugin is installed on."""
    root = Path(sysconfig.get_paths()["purelib"])
    seen, parts = set(), []
    for path in sorted(root.glob("*.dist-info/**/*")):
        if not path.is_file() or not path.name.upper().startswith("LICEN"):
            continue
        text = path.read_text(errors="replace").strip()
        digest = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()  # same text, other spacing
        if text and digest not in seen:
            seen.add(digest)
            parts.append(text)
    if not parts:
        raise FileNotFoundError(f"no license files under {root}/*.dist-info: no other-domain text")
    return "\n\n".join(parts)


def spread_windows(tokenizer, text: str, seq_len: int, count: int) -> torch.Tensor:
    """``count`` windows of ``seq_len`` tokens at evenly spaced offsets over the whole text
    (not only its first licenses): LongTensor (count, seq_len)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    if ids.numel() < seq_len:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    starts = torch.linspace(0, ids.numel() - seq_len, count).long()
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


# ---------------------------------------------------------------- validation / test

HELD_OUT_SPLITS = ("validation", "test")  # of the held-out windows: choose on one, report on the other


def _halves(windows: torch.Tensor, what: str) -> dict[str, torch.Tensor]:
    if windows.shape[0] < 2:
        raise ValueError(
            f"the {what} has {windows.shape[0]} window, and validation and test need one each; "
            "give more text or a smaller --seq-len"
        )
    half = windows.shape[0] // 2
    return {"validation": windows[:half], "test": windows[half:]}


def held_out_splits(tokenizer, text: str, seq_len: int, count: int, option: str = "--eval-windows"):
    """Disjoint validation and test windows of the evaluation text: {"validation": (V, seq_len),
    "test": (T, seq_len)}, each up to ``count`` windows.

    Consecutive non-overlapping windows from the start of ``text``: the first half validation, the
    second test (the embedded text's evaluation modules are in path order, so the two halves come
    from different modules). Neither overlaps calibration, which reads another split of the text.
    """
    _check_at_least(count, 1, "count", option)
    windows = eval_windows(tokenizer, text, seq_len, 2 * count, option=option)
    if windows.shape[0] < 2 * count:
        logger.warning(
            "the evaluation text has {} windows of {} tokens, fewer than 2 x {}: validation and test "
            "get half each",
            windows.shape[0],
            seq_len,
            count,
        )
    return _halves(windows, "evaluation text")


def spread_splits(tokenizer, text: str, seq_len: int, count: int) -> dict[str, torch.Tensor]:
    """Disjoint validation and test windows spread over ``text`` (e.g. :func:`other_domain_text`):
    2 x ``count`` evenly spaced windows, alternately validation and test; they overlap nowhere
    (fewer windows where the text is too short for that)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    fits = ids.numel() // seq_len  # non-overlapping windows the text holds
    total = min(2 * count, fits)
    if total < 2:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than two windows of {seq_len}")
    starts = torch.linspace(0, ids.numel() - seq_len, total).long()  # spacing >= seq_len
    windows = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
    return {"validation": windows[0::2], "test": windows[1::2]}
