"""Text sources and token windows. No hub access: hub loading is faked with monkeypatch."""

from __future__ import annotations

import json
import sysconfig

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from svdllm_plugin import data
from svdllm_plugin.data import EMBEDDED, calibration_dataset, embedded_text, eval_windows, load_text
from svdllm_plugin.models import cache_dir


def _byte_tokenizer():
    """One token per UTF-8 byte, so token counts are known exactly; tiny max length on purpose."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=8)


@pytest.fixture(scope="session")
def byte_tokenizer():
    return _byte_tokenizer()


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    """Both splits built cold in a private cache, read back warm, the cache files' texts, and what a
    read gives once the calibration file in the cache is changed."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SVDLLM_CACHE", str(tmp_path_factory.mktemp("cache")))
        cold = {s: embedded_text(s) for s in data.SPLITS}
        warm = {s: embedded_text(s) for s in data.SPLITS}
        folder = cache_dir() / "text"
        files = {p.name: p.read_bytes().decode("utf-8") for p in sorted(folder.iterdir())}
        calibration = next(name for name, text in files.items() if text == cold["calibration"])
        (folder / calibration).write_text("read from the cache", encoding="utf-8")
        changed = embedded_text("calibration")
    return {"cold": cold, "warm": warm, "files": files, "changed": changed}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SVDLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------- embedded text


def test_embedded_text_cached_and_sized(embedded):
    assert embedded["warm"] == embedded["cold"]
    assert len(embedded["files"]) == 2 and all(f.endswith(".txt") for f in embedded["files"])
    assert sorted(embedded["files"].values()) == sorted(embedded["cold"].values())  # the splits, verbatim
    assert embedded["changed"] == "read from the cache"  # a warm read is the cache file, not a rebuild
    assert len(embedded["cold"]["calibration"]) > 100_000
    assert len(embedded["cold"]["evaluation"]) > 20_000


def test_embedded_splits_disjoint(embedded):
    def paragraphs(split):
        return {p for p in embedded["cold"][split].split("\n\n") if len(p) > 200}

    calibration, evaluation = paragraphs("calibration"), paragraphs("evaluation")
    assert len(evaluation) > 20
    # whole docstrings are never repeated; a boilerplate paragraph inside two may be (importlib)
    assert len(calibration & evaluation) <= 0.01 * len(evaluation)


def _fake_stdlib(root):
    doc = "A docstring long enough to be kept, from module {}, number {}."
    for i in range(20):
        source = f'"""{doc.format(i, 0)}"""\n\ndef f():\n    """{doc.format(i, 1)}"""\n'
        (root / f"mod{i:02d}.py").write_text(source + 'class C:\n    """short"""\n')
    (root / "broken.py").write_text('"""never read: this file does not parse at all."""\ndef (:\n')
    (root / "zcopy.py").write_text(f'"""{doc.format(0, 0)}"""\n')  # a duplicate is dropped
    for skipped in ("test", "site-packages", "idlelib"):
        (root / skipped).mkdir()
        (root / skipped / "x.py").write_text(f'"""{doc.format(skipped, 0)}"""\n')
    (root / "pkg").mkdir()
    (root / "pkg" / "__init__.py").write_text(f'"""{doc.format("pkg", 0)}"""\n')


def test_embedded_text_from_fake_stdlib(tmp_path, cache, monkeypatch):
    _fake_stdlib(tmp_path)
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    calibration, evaluation = embedded_text("calibration"), embedded_text("evaluation")
    # sorted modules with new text: mod00..mod19, pkg/__init__ (zcopy is all duplicate); every 10th held out
    assert evaluation.split("\n\n") == [
        "A docstring long enough to be kept, from module 9, number 0.",
        "A docstring long enough to be kept, from module 9, number 1.",
        "A docstring long enough to be kept, from module 19, number 0.",
        "A docstring long enough to be kept, from module 19, number 1.",
    ]
    kept = calibration.split("\n\n")
    assert len(kept) == 2 * 18 + 1 and kept[-1].endswith("module pkg, number 0.")
    assert "short" not in calibration and "never read" not in calibration
    assert not any(s in calibration for s in ("module test", "site-packages", "idlelib"))
    # the cache is read back, not rebuilt
    monkeypatch.setattr(data.embedded, "_build_embedded", lambda: pytest.fail("cache was not used"))
    assert embedded_text("calibration") == calibration


def test_embedded_text_bad_split():
    with pytest.raises(ValueError, match="split must be one of"):
        embedded_text("train")


# ---------------------------------------------------------------- load_text


@pytest.mark.parametrize("dataset", [None, EMBEDDED])
def test_load_text_embedded(dataset, monkeypatch):
    monkeypatch.setattr(data.embedded, "embedded_text", lambda split: f"embedded {split}")
    assert load_text(dataset, "evaluation") == "embedded evaluation"


def test_load_text_txt_split_at_paragraph(tmp_path):
    paragraphs = [f"paragraph {i} " + "word " * 20 for i in range(50)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs))
    calibration, evaluation = load_text(str(path), "calibration"), load_text(str(path), "evaluation")
    assert calibration + "\n\n" + evaluation == path.read_text()
    assert calibration.split("\n\n") == paragraphs[:45]


def test_load_text_split_without_line_breaks(tmp_path):
    path = tmp_path / "one_line.txt"
    path.write_text("x" * 1000)
    assert len(load_text(str(path), "calibration")) == 900
    assert len(load_text(str(path), "evaluation")) == 100


def test_load_text_jsonl_and_json(tmp_path):
    records = [{"text": f"document {i}", "id": i} for i in range(20)]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    whole = "\n\n".join(r["text"] for r in records)
    assert load_text(str(jsonl), "calibration") + "\n\n" + load_text(str(jsonl), "evaluation") == whole
    as_json = tmp_path / "corpus.json"
    as_json.write_text(json.dumps(records))
    assert load_text(str(as_json), "calibration") == load_text(str(jsonl), "calibration")


@pytest.mark.parametrize(
    "name, content, error, match",
    [
        ("empty.txt", "", ValueError, "is empty"),
        ("blank.jsonl", '{"text": "  "}\n', ValueError, "is empty"),
        ("bad.jsonl", '{"text": "a"}\n{"body": "b"}\n', ValueError, r'bad\.jsonl, line 2: has no "text"'),
        ("broken.jsonl", '{"text": "a"}\n{"text": \n', ValueError, r"broken\.jsonl, line 2, column 11: not"),
        ("dict.json", '{"text": "a"}', ValueError, "expected a JSON list"),
        ("table.csv", "text\na\n", ValueError, "unsupported type '.csv'"),
    ],
)
def test_load_text_bad_files(tmp_path, name, content, error, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(error, match=match):
        load_text(str(path), "calibration")


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl", "missing.json", "./missing", "a/b/c"])
def test_load_text_missing_file(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"does not exist; give an existing \.txt"):
        load_text(name, "calibration")


def test_load_text_folder(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        load_text(str(tmp_path), "calibration")


def test_load_text_hub(monkeypatch):
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": [f"{split} line 1", f"{split} line 2"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_text("wikitext2", "calibration") == "train line 1\n\ntrain line 2"
    assert load_text("org/name:config", "evaluation") == "test line 1\n\ntest line 2"
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train"), ("org/name", "config", "test")]


def test_load_text_hub_errors(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="could not load dataset 'wikitext2'.*no network.*'embedded'"):
        load_text("wikitext2", "calibration")
    no_text = datasets.Dataset.from_dict({"body": ["a"]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: no_text)
    with pytest.raises(ValueError, match=r"no 'text' column \(columns: \['body'\]\)"):
        load_text("org/name", "calibration")
    empty = datasets.Dataset.from_dict({"text": ["", " "]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: empty)
    with pytest.raises(ValueError, match="is empty"):
        load_text("org/name", "evaluation")


# ---------------------------------------------------------------- token windows


def test_calibration_dataset(byte_tokenizer):
    text = "".join(chr(ord("a") + i % 26) for i in range(500))
    ds = calibration_dataset(byte_tokenizer, text, num_samples=8, seq_len=32, seed=3)
    assert ds.column_names == ["input_ids", "attention_mask"] and len(ds) == 8
    ids = byte_tokenizer(text, add_special_tokens=False)["input_ids"]
    for row, mask in zip(ds["input_ids"], ds["attention_mask"]):
        assert len(row) == 32 and mask == [1] * 32
        start = ids.index(row[0])  # the alphabet repeats: the window is a run of the text
        assert row == ids[start : start + 32]
    assert calibration_dataset(byte_tokenizer, text, 8, 32, seed=3)["input_ids"] == ds["input_ids"]
    assert calibration_dataset(byte_tokenizer, text, 8, 32, seed=4)["input_ids"] != ds["input_ids"]


@pytest.mark.parametrize(
    "text, num_samples, seq_len, match",
    [
        ("x" * 100, 0, 16, r"`num_samples` \(--num-samples\) must be an integer >= 1; got 0"),
        ("x" * 100, 4, 1, r"`seq_len` \(--seq-len\) must be an integer >= 2; got 1"),
        ("", 4, 16, "has 0 tokens"),
        ("x" * 16, 4, 16, r"16 tokens, fewer than --seq-len \+ 1 = 17; give more text or a smaller"),
    ],
)
def test_calibration_dataset_errors(byte_tokenizer, text, num_samples, seq_len, match):
    with pytest.raises(ValueError, match=match):
        calibration_dataset(byte_tokenizer, text, num_samples, seq_len)


def test_eval_windows(byte_tokenizer):
    text = "0123456789" * 10 + "abc"
    windows = eval_windows(byte_tokenizer, text, seq_len=10)
    assert windows.dtype == torch.long and windows.shape == (10, 10)
    assert torch.equal(windows[3], windows[0])
    assert eval_windows(byte_tokenizer, text, seq_len=10, max_windows=3).shape == (3, 10)
    with pytest.raises(ValueError, match="has 103 tokens, fewer than one window of --seq-len 200; give more"):
        eval_windows(byte_tokenizer, text, seq_len=200)
    with pytest.raises(ValueError, match="max_windows"):
        eval_windows(byte_tokenizer, text, seq_len=10, max_windows=0)


def test_no_too_long_warning(caplog):
    tokenizer, text = _byte_tokenizer(), "a long text\n\n" * 10
    assert data.windows.token_ids(tokenizer, text).numel() == len(text)
    assert "longer than the specified maximum" not in caplog.text
    tokenizer(text)  # the control: without verbose=False it does warn
    assert "longer than the specified maximum" in caplog.text


def test_chunked_tokenization_matches_whole(embedded, tokenizer):
    text = embedded["cold"]["evaluation"]
    chunks = data.windows._chunks(text, size=10_000)
    assert len(chunks) > 5 and "".join(chunks) == text
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert data.windows.token_ids(tokenizer, text).tolist() == whole


def test_real_tokenizer_end_to_end(embedded, tokenizer):
    ds = calibration_dataset(tokenizer, embedded["cold"]["calibration"], num_samples=4, seq_len=256)
    assert [len(r) for r in ds["input_ids"]] == [256] * 4
    windows = eval_windows(tokenizer, embedded["cold"]["evaluation"], seq_len=512)
    assert windows.shape[0] > 50
