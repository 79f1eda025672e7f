"""lm-eval integration on a tiny Llama with the real SmolLM2 tokenizer; nothing touches a network."""

from __future__ import annotations

import json
import math
import socket

import pytest
import yaml

from svdllm_plugin import data
from svdllm_plugin import lm_eval as harness
from svdllm_plugin.lm_eval import (
    OFFLINE_TASK,
    embedded_documents,
    format_results,
    offline_task_dir,
    run_lm_eval,
)
from svdllm_plugin.models import cache_dir

LIMIT = 3
METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def _refuse_network(self, address):
    raise AssertionError(f"a test tried to connect to {address}; the offline task must not")


@pytest.fixture(scope="module")
def tiny_model(tiny_factory):
    # max_position_embeddings 256 is lm-eval's window: short, so rolling windows are exercised
    return tiny_factory(hidden=32, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def evaluated(tiny_model, tokenizer, tmp_path_factory):
    """One offline run on the real embedded text, in a private cache, with sockets refused."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SVDLLM_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(socket.socket, "connect", _refuse_network)
        tiny_model.train()  # run_lm_eval must hand the model back in the mode it got it
        results = run_lm_eval(tiny_model, tokenizer, [OFFLINE_TASK], limit=LIMIT)
        task_dir = offline_task_dir()
    return {"results": results, "training": tiny_model.training, "task_dir": task_dir}


@pytest.fixture
def fake_text(monkeypatch, tmp_path):
    """100 paragraphs of 58 chars as the embedded evaluation text, in a private cache."""
    monkeypatch.setenv("SVDLLM_CACHE", str(tmp_path / "cache"))
    paragraphs = [f"para {i:03d} " + "x" * 49 for i in range(100)]

    def embedded_text(split: str) -> str:
        assert split == "evaluation"
        return "\n\n".join(paragraphs) + "\n\n   \n\n"  # a trailing blank paragraph is dropped

    monkeypatch.setattr(data, "embedded_text", embedded_text)
    return paragraphs


def test_documents_group_paragraphs_and_sample_evenly(fake_text):
    docs = embedded_documents(max_docs=5, doc_chars=200)
    # 4 paragraphs of 58 chars reach 200: 25 documents, every 5th taken
    assert docs == ["\n\n".join(fake_text[i : i + 4]) for i in range(0, 100, 20)]
    assert len(embedded_documents(max_docs=1000, doc_chars=200)) == 25


@pytest.mark.parametrize("max_docs, doc_chars", [(0, 2000), (5, 0), (-1, -1)])
def test_documents_reject_non_positive_sizes(fake_text, max_docs, doc_chars):
    with pytest.raises(ValueError, match="must be positive"):
        embedded_documents(max_docs, doc_chars)


def test_task_dir_is_written_once_and_keyed_by_content(fake_text):
    task_dir = offline_task_dir(max_docs=4, doc_chars=200)
    yaml_path = task_dir / f"{OFFLINE_TASK}.yaml"
    mtime = yaml_path.stat().st_mtime_ns
    assert offline_task_dir(max_docs=4, doc_chars=200) == task_dir
    assert yaml_path.stat().st_mtime_ns == mtime  # cached, not rewritten

    config = yaml.safe_load(yaml_path.read_text())
    assert config["task"] == OFFLINE_TASK and config["dataset_path"] == "json"
    data_file = config["dataset_kwargs"]["data_files"]["test"]
    lines = open(data_file, encoding="utf-8").read().splitlines()
    assert [json.loads(line)["text"] for line in lines] == embedded_documents(4, 200)
    assert config["dataset_kwargs"]["cache_dir"].startswith(str(task_dir))

    other = offline_task_dir(max_docs=5, doc_chars=200)
    assert other != task_dir and other.parent == task_dir.parent == cache_dir() / "lm_eval_tasks"
    assert sorted(p.name for p in task_dir.parent.iterdir()) == sorted([task_dir.name, other.name])


def test_lost_write_race_keeps_the_winner_and_no_temp(fake_text):
    task_dir = offline_task_dir(max_docs=4, doc_chars=200)
    before = (task_dir / f"{OFFLINE_TASK}.yaml").read_text()
    harness._write_task_dir(task_dir, "{}\n", "task: __DATA_FILE__ __DATASETS_CACHE__\n")
    assert (task_dir / f"{OFFLINE_TASK}.yaml").read_text() == before
    assert [p.name for p in task_dir.parent.iterdir()] == [task_dir.name]


def test_offline_run_reports_perplexities(evaluated):
    results = evaluated["results"]
    task = results["results"][OFFLINE_TASK]
    assert task["sample_len"] == LIMIT
    values = {m: task[f"{m},none"] for m in METRICS}
    assert all(math.isfinite(v) and v > 0 for v in values.values()), values
    # both come from the same sum of log-likelihoods over the same bytes
    assert values["bits_per_byte"] == pytest.approx(math.log2(values["byte_perplexity"]))

    table = format_results(results)
    assert OFFLINE_TASK in table
    for metric in METRICS:
        assert metric in table
    assert evaluated["training"] is True


def test_offline_task_does_not_index_lm_evals_own_tasks(evaluated, monkeypatch):
    monkeypatch.setenv("SVDLLM_CACHE", str(evaluated["task_dir"].parents[1]))
    assert harness._task_manager([OFFLINE_TASK]).all_tasks == [OFFLINE_TASK]


def test_bad_task_lists_name_the_fix(tiny_model, tokenizer, evaluated, monkeypatch):
    with pytest.raises(ValueError, match="list of task names"):
        run_lm_eval(tiny_model, tokenizer, OFFLINE_TASK)
    with pytest.raises(ValueError, match="list of task names"):
        run_lm_eval(tiny_model, tokenizer, [])

    from lm_eval.tasks import TaskManager

    # indexing lm-eval's ~15k default tasks takes seconds; an empty index shows the same message
    monkeypatch.setattr(harness, "_task_manager", lambda tasks: TaskManager(include_defaults=False))
    with pytest.raises(ValueError, match="unknown lm-eval task.*lm_eval ls tasks"):
        run_lm_eval(tiny_model, tokenizer, ["no_such_task"])
