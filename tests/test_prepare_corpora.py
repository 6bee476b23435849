"""`sparkgpt prepare` on the formats of the web-scale corpora: Wikipedia dumps, Common Crawl WET, parquet and
compressed JSONL come out clean, with planted duplicates removed and counted; bad records are skipped and named;
memory stays flat as the input grows; shards are bounded, read back as one array, resume exactly, and Ray writes
the same shards as the local engine."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from corpus_fixtures import truncate, write_jsonl, write_mediawiki, write_parquet, write_wet

from sparkgpt.cli import main
from sparkgpt.data import TokenData, prepare
from sparkgpt.data.readers import Document, read_documents
from sparkgpt.data.tokens import ShardedTokens
from sparkgpt.tokenizer import Tokenizer
from sparkgpt.train import train
from sparkgpt.train import trainer as trainer_module

NOUNS = ("river", "market", "garden", "engine", "village", "teacher", "harbour", "library", "mountain", "bridge",
         "window", "forest", "kitchen", "station", "painter", "island", "castle", "farmer", "soldier", "letter",
         "school", "doctor", "museum", "valley", "tower", "sailor", "orchard", "meadow", "factory", "theatre")
VERBS = ("visited", "described", "repaired", "followed", "painted", "crossed", "protected", "remembered",
         "measured", "opened", "carried", "watched", "built", "found", "studied", "answered", "named", "moved")
ADJECTIVES = ("old", "quiet", "northern", "busy", "narrow", "famous", "small", "bright", "ancient", "wooden",
              "crowded", "distant", "green", "modern", "gentle", "broken", "royal", "hidden", "early", "silent")


def sentence(rng: random.Random) -> str:
    pick = rng.choice
    return (f"The {pick(ADJECTIVES)} {pick(NOUNS)} {pick(VERBS)} the {pick(NOUNS)} of a {pick(ADJECTIVES)} "
            f"{pick(NOUNS)} that was near the {pick(NOUNS)} and {pick(VERBS)} it with {pick(ADJECTIVES)} care.")


def article(seed: int, sentences: int = 10) -> str:
    """Prose that passes the Gopher and C4 rules: real stop words, sentences ending in full stops."""
    rng = random.Random(seed)
    return " ".join(sentence(rng) for _ in range(sentences))


def near_copy(text: str, seed: int) -> str:
    """The same article with one sentence rewritten: a near duplicate (shingle Jaccard about 0.85)."""
    parts = text.split(". ")
    parts[len(parts) // 2] = sentence(random.Random(seed)).rstrip(".")
    return ". ".join(parts)


def texts_of(path: Path) -> list[str]:
    return [item.text for item in read_documents(path) if isinstance(item, Document)]


def write_corpus(root: Path) -> dict[str, list[str]]:
    """Four formats, each with an exact and a near duplicate planted; returns the texts that must survive."""
    root.mkdir(parents=True)
    wiki = [article(1), article(2)]
    write_mediawiki(root / "wiki.xml.bz2", [
        ("Raven", f"{{{{Infobox bird|name=Raven}}}}\n'''Raven''' {wiki[0]} See [[Crow|crows]].\n\n"
                  "[[Category:Birds]]"),
        ("Heron", f"{wiki[1]}\n[[Category:Birds]]"),
        ("Raven (copy)", f"{{{{Infobox bird|name=Raven}}}}\n'''Raven''' {wiki[0]} See [[Crow|crows]].\n\n"
                         "[[Category:Birds]]"),
        ("Heron again", f"{near_copy(wiki[1], 99)}\n[[Category:Birds]]"),
    ])
    web = [article(3), article(4)]
    write_wet(root / "crawl.warc.wet.gz", [
        ("http://a.example/", web[0]), ("http://b.example/", web[1]), ("http://c.example/", web[0]),
        ("http://d.example/", near_copy(web[1], 98)), ("http://e.example/", "Click here! Buy now\nLogin"),
    ])
    rows = [article(5), article(6)]
    write_parquet(root / "rows.parquet", [rows[0], rows[1], rows[0], near_copy(rows[1], 97)])
    records = [article(7), article(8)]
    write_jsonl(root / "records.jsonl.zst", [{"text": t} for t in (records[0], records[1], records[0],
                                                                   near_copy(records[1], 96))])
    wiki_texts = texts_of(root / "wiki.xml.bz2")
    return {"crawl.warc.wet.gz": web, "records.jsonl.zst": records, "rows.parquet": rows,
            "wiki.xml.bz2": wiki_texts[:2]}


def decoded(folder: Path) -> str:
    data = TokenData(folder)
    ids = np.concatenate([np.asarray(data.train), np.asarray(data.val)]).tolist()
    return Tokenizer.from_dir(folder).decode(ids)


def test_every_format_comes_out_clean_with_duplicates_removed_and_counted(tmp_path, capsys):
    kept = write_corpus(tmp_path / "corpus")
    assert main(["prepare", str(tmp_path / "corpus"), "--out", str(tmp_path / "data"), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "duplicates: 8 removed" in out, out

    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    stages = {stage["stage"]: stage for stage in meta["stages"]}
    assert stages["exact duplicates"]["removed_documents"] == 4
    assert stages["near duplicates"]["removed_documents"] == 4
    assert stages["quality"]["removed_documents"] == 1  # the crawled boilerplate page; prose from files is kept
    assert meta["duplicates"] == 8 and meta["documents"] == 8
    for wiki in kept["wiki.xml.bz2"]:
        assert "{{" not in wiki and "[[" not in wiki and "Category" not in wiki and "'''" not in wiki
    assert "Raven" in kept["wiki.xml.bz2"][0] and "crows" in kept["wiki.xml.bz2"][0]
    # Token counts match: the char tokens decode to exactly the surviving documents, in corpus order.
    expected = "".join(text + "\n" for name in sorted(kept) for text in kept[name])
    assert decoded(tmp_path / "data") == expected
    assert stages["tokenize"]["tokens"] == len(expected) == meta["train_tokens"] + meta["val_tokens"]


def test_bad_files_and_records_are_named_skipped_and_counted(tmp_path, capsys):
    root = tmp_path / "corpus"
    root.mkdir()
    good = [article(11), article(12), article(13)]
    write_jsonl(root / "a.jsonl", [{"text": good[0]}, {"body": "no text field"}, {"text": good[1]}])
    write_mediawiki(root / "b.xml.gz", [(f"Page {i}", article(20 + i)) for i in range(40)])
    truncate(root / "b.xml.gz", 0.5)  # gzip, unlike bz2 (900 kB blocks), yields what precedes the cut
    (root / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200))
    (root / "d.txt").write_text(good[2], encoding="utf-8")
    result = prepare([root], tmp_path / "data", workers=1, progress=False)
    err = capsys.readouterr().err
    assert "a.jsonl:line 2: no string field 'text'" in err, err
    assert "b.xml.gz" in err and "truncated or corrupt archive" in err, err
    assert "c.png: unknown format" in err, err
    assert result.skipped == 3
    text = decoded(tmp_path / "data")
    assert all(document in text for document in good)  # the rest of the corpus is still prepared
    assert text.count("The ") > 0 and article(20) in text  # the pages before the damage survive
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["skipped"]["count"] == 3 and len(meta["skipped"]["examples"]) == 3


MEMORY_SCRIPT = """
import json, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_prepare_corpora import article
from corpus_fixtures import write_jsonl
from sparkgpt.data import prepare
documents = int(sys.argv[2])
write_jsonl(Path(sys.argv[1]) / "in.jsonl.zst", ({"text": article(seed, 12)} for seed in range(documents)))
prepare([sys.argv[1] + "/in.jsonl.zst"], sys.argv[1] + "/out", tokenizer="char", workers=1, progress=False)
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.mark.slow
def test_peak_memory_grows_less_than_a_fifth_when_the_input_grows_fourfold(tmp_path):
    peaks = []
    for documents in (4_000, 16_000):  # about 5 MB and 20 MB of text
        folder = tmp_path / str(documents)
        folder.mkdir()
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(MEMORY_SCRIPT), str(folder), str(documents),
                                 str(Path(__file__).parent)], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        peaks.append(json.loads(result.stdout.strip().splitlines()[-1])["peak_kib"])
    assert peaks[1] < 1.2 * peaks[0], peaks


def test_sharded_tokens_read_as_one_array_across_shard_ends(tmp_path):
    rng = np.random.default_rng(0)
    whole = rng.integers(0, 500, size=1000).astype(np.uint16)
    shards = np.split(whole, [100, 101, 550])
    tokens = ShardedTokens(shards, "uint16")
    assert len(tokens) == 1000 and np.array_equal(np.asarray(tokens), whole)
    for start, stop in [(0, 1000), (95, 130), (100, 101), (99, 552), (549, 551), (999, 1000), (400, 400)]:
        assert np.array_equal(tokens[start:stop], whole[start:stop]), (start, stop)


TINY = {"model.n_layers": "1", "model.n_heads": "2", "model.d_model": "32", "model.d_ff": "64", "block_size": "64",
        "batch_size": "4", "dtype": "float32", "warmup_steps": "2", "eval_batches": "2", "compile": "false",
        "max_steps": "12", "save_every": "4", "eval_every": "4", "log_every": "1"}


def test_shards_are_bounded_and_training_resumes_at_the_exact_position(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(article(seed) for seed in range(12)) + "\n", encoding="utf-8")
    prepare([corpus], tmp_path / "whole", workers=1, progress=False)
    prepare([corpus], tmp_path / "sharded", workers=1, progress=False, shard_tokens=1000)
    meta = json.loads((tmp_path / "sharded" / "meta.json").read_text())
    assert len(meta["train_shards"]) > 5 and all(shard["tokens"] <= 1000 for shard in meta["train_shards"])
    whole, sharded = TokenData(tmp_path / "whole"), TokenData(tmp_path / "sharded")
    assert isinstance(sharded.train, ShardedTokens)
    assert np.array_equal(np.asarray(sharded.train), np.asarray(whole.train))
    assert np.array_equal(np.asarray(sharded.val), np.asarray(whole.val))

    overrides = {**TINY, "data": str(tmp_path / "sharded")}
    train("shakespeare-char", tmp_path / "straight", overrides, progress=False)
    original = trainer_module.Trainer.train_step

    def crash_at_step_6(self):
        if self.step == 6:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train("shakespeare-char", tmp_path / "resumed", overrides, progress=False)
    monkeypatch.setattr(trainer_module.Trainer, "train_step", original)
    train(None, tmp_path / "resumed", resume=True, progress=False)
    final = "checkpoints/step-0000012/model.safetensors"
    assert (tmp_path / "resumed" / final).read_bytes() == (tmp_path / "straight" / final).read_bytes()


@pytest.mark.slow
def test_the_ray_engine_writes_the_same_shards_as_the_local_engine(tmp_path):
    pytest.importorskip("ray.data")
    write_corpus(tmp_path / "corpus")
    prepare([tmp_path / "corpus"], tmp_path / "local", tokenizer="bpe:300", workers=2, progress=False,
            shard_tokens=500)
    prepare([tmp_path / "corpus"], tmp_path / "ray", tokenizer="bpe:300", workers=2, progress=False,
            shard_tokens=500, engine="ray")
    local, ray = (json.loads((tmp_path / name / "meta.json").read_text()) for name in ("local", "ray"))
    assert local["train_shards"] == ray["train_shards"] and local["val_shards"] == ray["val_shards"]
    assert local["stages"] == ray["stages"] and ray["engine"] == "ray"
    for shard in local["train_shards"] + local["val_shards"]:
        assert (tmp_path / "local" / shard["file"]).read_bytes() == (tmp_path / "ray" / shard["file"]).read_bytes()


def test_languages_keep_only_the_named_ones_and_bad_options_are_one_line_errors(tmp_path, capsys):
    english = article(31)
    french = ("Le vieux marché se trouve au bord de la rivière, et les habitants du village y viennent chaque matin "
              "pour acheter du pain, des fruits et des légumes frais. ") * 3
    german = ("Der alte Markt liegt am Ufer des Flusses, und die Bewohner des Dorfes kommen jeden Morgen dorthin, "
              "um Brot, Obst und frisches Gemüse zu kaufen. ") * 3
    write_jsonl(tmp_path / "mixed.jsonl", [{"text": text} for text in (english, french, german)])
    assert main(["prepare", str(tmp_path / "mixed.jsonl"), "--out", str(tmp_path / "data"), "--languages", "en",
                 "--workers", "1"]) == 0
    assert "language          removed 2 documents" in capsys.readouterr().out
    assert decoded(tmp_path / "data") == english + "\n"

    for option, message in ((["--format", "csv"], "format 'csv': expected one of text, jsonl"),
                            (["--dedup", "fuzzy"], "--dedup 'fuzzy': expected exact, near"),
                            (["--languages", "xx"], "languages")):
        assert main(["prepare", str(tmp_path / "mixed.jsonl"), "--out", str(tmp_path / "bad"), *option]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("sparkgpt: error: ") and message in err[-1], err
        assert not (tmp_path / "bad").exists()
