"""Evaluate an in-memory model with EleutherAI's lm-evaluation-harness.

``run_lm_eval`` wraps the model in lm-eval's own ``HFLM`` and calls ``simple_evaluate``,
so any lm-eval task name works where its dataset can be reached. One task needs no
download: ``svdllm_embedded``, perplexity on the plugin's embedded held-out text, written
by ``offline_task_dir`` from the template ``lm_eval_tasks/svdllm_embedded.yaml`` beside
this module (see integrations/lm_eval/).

This module shares its last name with the ``lm_eval`` package; every import here is
absolute, so ``import lm_eval`` below is the harness, not this file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from loguru import logger

from svdllm_plugin.models import cache_dir

__all__ = ["OFFLINE_TASK", "offline_task_dir", "embedded_documents", "run_lm_eval", "format_results"]

OFFLINE_TASK = "svdllm_embedded"
_TEMPLATE_NAME = f"{OFFLINE_TASK}.yaml"
_PLACEHOLDERS = ("__DATA_FILE__", "__DATASETS_CACHE__")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def _template_path() -> Path:
    """The task YAML template, shipped as package data beside this module."""
    return Path(__file__).resolve().parent / "lm_eval_tasks" / _TEMPLATE_NAME


def embedded_documents(max_docs: int = 50, doc_chars: int = 2000) -> list[str]:
    """Held-out embedded text cut at blank lines into documents of about ``doc_chars``.

    Paragraphs are joined until a document reaches ``doc_chars`` (a longer paragraph stays
    whole); ``max_docs`` documents are taken evenly spaced over the text, so every part of
    it is sampled, not only the first modules.
    """
    if max_docs < 1 or doc_chars < 1:
        raise ValueError(f"max_docs and doc_chars must be positive; got {max_docs}, {doc_chars}")
    from svdllm_plugin.data import embedded_text

    docs, current = [], []
    for paragraph in _PARAGRAPH_BREAK.split(embedded_text("evaluation")):
        if paragraph.strip():
            current.append(paragraph.strip("\n"))
        if current and sum(len(p) for p in current) >= doc_chars:
            docs.append("\n\n".join(current))
            current = []
    if current:
        docs.append("\n\n".join(current))
    if not docs:
        raise ValueError("the embedded evaluation text is empty; delete the cache folder and rebuild it")
    step = len(docs) / min(max_docs, len(docs))
    return [docs[int(i * step)] for i in range(min(max_docs, len(docs)))]


def _write_task_dir(dest: Path, jsonl: str, template: str) -> None:
    """Write data + YAML into a temp folder and rename it into place (another process may win)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        (tmp / f"{OFFLINE_TASK}.jsonl").write_text(jsonl, encoding="utf-8")
        # paths as they will be after the rename; a JSON string is a valid YAML scalar
        values = (dest / f"{OFFLINE_TASK}.jsonl", dest / "hf_datasets")
        for placeholder, value in zip(_PLACEHOLDERS, values):
            template = template.replace(placeholder, json.dumps(str(value)))
        (tmp / _TEMPLATE_NAME).write_text(template, encoding="utf-8")
        os.rename(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / _TEMPLATE_NAME).is_file():  # not a lost race: a real failure
            raise


def offline_task_dir(max_docs: int = 50, doc_chars: int = 2000) -> Path:
    """A folder for lm-eval's ``include_path`` holding the ``svdllm_embedded`` task and its data.

    Cached under ``cache_dir() / "lm_eval_tasks"``, keyed by a hash of the documents and the
    template, so a change to either writes a new folder instead of reusing a stale one.
    """
    template = _template_path().read_text(encoding="utf-8")
    missing = [p for p in _PLACEHOLDERS if p not in template]
    if missing:
        raise ValueError(f"{_template_path()} lacks the placeholder(s) {missing}; restore them")
    docs = embedded_documents(max_docs, doc_chars)
    jsonl = "".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in docs)
    key = hashlib.sha1((template + jsonl).encode("utf-8")).hexdigest()[:12]
    dest = cache_dir() / "lm_eval_tasks" / f"{OFFLINE_TASK}-{key}"
    if not (dest / _TEMPLATE_NAME).is_file():
        _write_task_dir(dest, jsonl, template)
        logger.info("Wrote lm-eval task {} ({} documents) to {}", OFFLINE_TASK, len(docs), dest)
    return dest


def _task_manager(tasks: list[str]):
    """Our task folder, plus lm-eval's own tasks only when one is asked for (indexing them takes ~7 s)."""
    from lm_eval.tasks import TaskManager

    include_defaults = any(task != OFFLINE_TASK for task in tasks)
    return TaskManager(include_path=str(offline_task_dir()), include_defaults=include_defaults)


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
) -> dict:
    """Run lm-eval ``tasks`` on an in-memory HF causal LM; return lm-eval's results dict.

    ``limit`` caps the documents per task; ``max_length`` caps the tokens per forward pass
    (default: the model config's ``max_position_embeddings``).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"tasks must be a list of task names, e.g. [{OFFLINE_TASK!r}]; got {tasks!r}")
    task_manager = _task_manager(tasks)
    unknown = [task for task in tasks if task not in task_manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}; "
            f"use {OFFLINE_TASK!r} offline, or a name from `lm_eval ls tasks`"
        )
    was_training = model.training
    try:  # HFLM puts the model in eval mode (and re-ties its weights)
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            device=str(model.device),
            batch_size=batch_size,
            max_length=max_length,
        )
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, limit=limit, task_manager=task_manager, log_samples=False
        )
    finally:
        model.train(was_training)
    logger.info("lm-eval {} done in {:.1f} s", tasks, time.perf_counter() - start)
    return results


def format_results(results: dict) -> str:
    """lm-eval's own markdown table of ``results`` (plus the groups table when there are groups)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
