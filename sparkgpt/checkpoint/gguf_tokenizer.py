"""A tokenizer in GGUF metadata, both ways: the `tokenizer.ggml.*` keys llama.cpp writes (a GGUF file carries no
tokenizer.json) read into our Tokenizer, and our byte-level BPE tokenizer written as those keys."""

from __future__ import annotations

import json
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from sparkgpt.checkpoint.gguf import ARRAY, BOOL, INT32, STRING, UINT32
from sparkgpt.config import ModelConfig
from sparkgpt.errors import SparkGPTError
from sparkgpt.tokenizer import Tokenizer

# tokenizer.ggml.token_type values (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
NORMAL_TOKEN, CONTROL_TOKEN, USER_DEFINED_TOKEN, UNUSED_TOKEN = 1, 3, 4, 5

# How text is split into words before byte-level BPE, by llama.cpp's `tokenizer.ggml.pre` name. The merges were
# learned on words split this way, so another split gives other (worse) ids.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
REGEX_SPLITS = {"llama3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}


def _byte_level_splitter(pre: str | None) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)  # with GPT-2's own word regex
    if pre == "smollm":
        # SmolLM's tokenizer.json (and llama.cpp's "smollm") splits every digit off before GPT-2's regex.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in REGEX_SPLITS:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(REGEX_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    return byte_level


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece files list scores, not merges: every split of a token into two known pieces is a merge,
    ranked by the merged token's score (best first), ties by the pieces' lengths and ids."""
    vocab = {token: index for index, token in enumerate(tokens)}
    candidates = []
    for token, score in zip(tokens, scores, strict=True):
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        candidates.extend((left, right, score) for left, right in pairs)
    candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def read_tokenizer(metadata: dict[str, Any], source: str = "GGUF file") -> Tokenizer:
    """The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata (it carries no tokenizer.json)."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise SparkGPTError(f"{source}: no tokenizer.ggml.tokens vocabulary in the metadata")
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges", [])]
    if kind == "gpt2":
        backend = BackendTokenizer(models.BPE(vocab, merges, fuse_unk=False))
        backend.pre_tokenizer = _byte_level_splitter(metadata.get("tokenizer.ggml.pre"))
        backend.decoder = decoders.ByteLevel()
    elif kind == "llama":
        if not merges:
            merges = _merges_from_scores(tokens, metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        unknown_id = metadata.get("tokenizer.ggml.unknown_token_id")
        backend = BackendTokenizer(models.BPE(
            vocab, merges, unk_token=tokens[unknown_id] if unknown_id is not None else None, fuse_unk=True,
            byte_fallback=True,
        ))
        space_prefix = metadata.get("tokenizer.ggml.add_space_prefix", True)
        # SentencePiece marks word starts with ▁ and spells a missing piece as <0xNN> byte tokens.
        backend.pre_tokenizer = pre_tokenizers.Metaspace("▁", "first" if space_prefix else "never", split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    else:
        raise SparkGPTError(f"{source}: tokenizer.ggml.model {kind!r} is not supported; expected 'gpt2' or 'llama'")
    token_types = metadata.get("tokenizer.ggml.token_type") or []
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, kind in enumerate(token_types) if kind == CONTROL_TOKEN])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, kind in enumerate(token_types) if kind == USER_DEFINED_TOKEN])

    def special(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None

    bos, eos = special("bos"), special("eos")
    add_bos = metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")
    if add_bos and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return Tokenizer(backend, bos_token=bos, eos_token=eos, chat_template=metadata.get("tokenizer.chat_template"))


def _pre_tokenizer_name(tokenizer: Tokenizer) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for this tokenizer's word split: the name whose split our GGUF reader
    builds identically, so a file we write reads back with the same split."""
    split = json.loads(tokenizer.backend.to_str()).get("pre_tokenizer")
    for name in ("gpt-2", "smollm", *REGEX_SPLITS):
        if json.loads(_byte_level_splitter(name).__getstate__()) == split:
            return name
    raise SparkGPTError(f"GGUF export supports byte-level BPE tokenizers (GPT-2's, SmolLM's or Llama 3's word "
                        f"split); this tokenizer's pre-tokenizer is {json.dumps(split)[:120]}")


def _merges(tokenizer: Tokenizer) -> list[str]:
    """The BPE merges as GGUF spells them: "left right" (tokenizer.json has "left right" or [left, right])."""
    model = json.loads(tokenizer.backend.to_str())["model"]
    if model.get("type") != "BPE":
        raise SparkGPTError(f"GGUF export supports byte-level BPE tokenizers; this one is {model.get('type')}")
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]


def tokenizer_metadata(tokenizer: Tokenizer | None, config: ModelConfig) -> dict[str, tuple[int, Any]]:
    """tokenizer.* keys: the vocabulary in id order (padded with unused [PADn] tokens up to the model's
    vocabulary, as llama.cpp's converter pads), token types, merges, special ids, add_bos, chat template."""
    if tokenizer is None:
        raise SparkGPTError("GGUF export needs the model's tokenizer (a GGUF file carries it); this model has none")
    pre = _pre_tokenizer_name(tokenizer)
    merges = _merges(tokenizer)
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= config.vocab_size:
        raise SparkGPTError(f"the tokenizer has token id {max(vocab.values())} but the model's vocabulary has only "
                            f"{config.vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(config.vocab_size)]
    token_types = [UNUSED_TOKEN] * config.vocab_size
    for token, index in vocab.items():
        tokens[index], token_types[index] = token, NORMAL_TOKEN
    for index, added in tokenizer.backend.get_added_tokens_decoder().items():
        token_types[index] = CONTROL_TOKEN if added.special else USER_DEFINED_TOKEN
    metadata: dict[str, tuple[int, Any]] = {
        "tokenizer.ggml.model": (STRING, "gpt2"),
        "tokenizer.ggml.pre": (STRING, pre),
        "tokenizer.ggml.tokens": ((ARRAY, STRING), tokens),
        "tokenizer.ggml.token_type": ((ARRAY, INT32), token_types),
        "tokenizer.ggml.merges": ((ARRAY, STRING), merges),
    }
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    special_ids = {
        "bos": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id,
        "eos": tokenizer.eos_token_id if tokenizer.eos_token_id is not None else eos,
        "unknown": tokenizer.token_to_id(json.loads(tokenizer.backend.to_str())["model"].get("unk_token")),
        "padding": config.pad_token_id,
    }
    for key, index in special_ids.items():
        if index is not None:
            metadata[f"tokenizer.ggml.{key}_token_id"] = (UINT32, index)
    # Whether encoding puts the beginning-of-text token in front: llama.cpp then adds it too.
    adds_bos = special_ids["bos"] is not None and tokenizer.backend.encode("").ids[:1] == [special_ids["bos"]]
    metadata["tokenizer.ggml.add_bos_token"] = (BOOL, adds_bos)
    if tokenizer.chat_template is not None:
        metadata["tokenizer.chat_template"] = (STRING, tokenizer.chat_template)
    return metadata
