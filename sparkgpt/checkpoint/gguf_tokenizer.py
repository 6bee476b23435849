"""A tokenizer in GGUF metadata, both ways: the `tokenizer.ggml.*` keys llama.cpp writes (a GGUF file carries no
tokenizer.json) read into our Tokenizer, and our BPE tokenizers written as those keys: byte-level ones as "gpt2"
(with merges), SentencePiece-style ones (▁ for spaces, <0xNN> byte fallback: Llama 2, Gemma) as "llama" (with
scores, which is all llama.cpp's SentencePiece tokenizer reads)."""

from __future__ import annotations

import json
import re
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from sparkgpt.checkpoint.gguf import ARRAY, BOOL, FLOAT32, INT32, STRING, UINT32
from sparkgpt.config import ModelConfig
from sparkgpt.errors import SparkGPTError
from sparkgpt.tokenizer import Tokenizer

# tokenizer.ggml.token_type values (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
NORMAL_TOKEN, UNKNOWN_TOKEN, CONTROL_TOKEN, USER_DEFINED_TOKEN, UNUSED_TOKEN, BYTE_TOKEN = 1, 2, 3, 4, 5, 6

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


def _pre_tokenizer_name(split: dict[str, Any] | None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for this word split (a tokenizer.json pre_tokenizer): the name whose split
    our GGUF reader builds identically, so a file we write reads back with the same split."""
    for name in ("gpt-2", "smollm", *REGEX_SPLITS):
        if json.loads(_byte_level_splitter(name).__getstate__()) == split:
            return name
    raise SparkGPTError(f"GGUF export supports byte-level BPE tokenizers (GPT-2's, SmolLM's or Llama 3's word "
                        f"split) and SentencePiece-style BPE (▁ for spaces, byte fallback); this tokenizer's "
                        f"pre-tokenizer is {json.dumps(split)[:120]}")


def _component(component: Any) -> Any:
    return json.loads(component.__getstate__())


# How a SentencePiece-style tokenizer.json marks spaces (normalizer, pre-tokenizer) -> whether it puts a ▁ before
# the text (llama.cpp's add_space_prefix): Gemma's, old and new Llama 2 files', and what our reader builds.
_SENTENCEPIECE_SPACES = [
    ((_component(normalizers.Replace(" ", "▁")), None), False),
    ((_component(normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])), None), True),
    ((None, _component(pre_tokenizers.Metaspace("▁", "first", split=False))), True),
    ((None, _component(pre_tokenizers.Metaspace("▁", "never", split=False))), False),
]
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def _sentencepiece_space_prefix(state: dict[str, Any]) -> bool | None:
    """For a SentencePiece-style BPE tokenizer.json (byte fallback, spaces as ▁), whether it puts a ▁ before the
    text; None for any other tokenizer."""
    if not state["model"].get("byte_fallback"):
        return None
    spaces = (state.get("normalizer"), state.get("pre_tokenizer"))
    return next((prefix for form, prefix in _SENTENCEPIECE_SPACES if form == spaces), None)


def _scores_from_merges(tokens: list[str], merges: list[tuple[str, str]]) -> list[float]:
    """SentencePiece (and llama.cpp) merge the adjacent pair whose union scores highest: each piece scores minus the
    rank of the first merge that makes it, and a piece no merge makes (characters, bytes, specials) the least."""
    first_made: dict[str, int] = {}
    for left, right in merges:
        first_made.setdefault(left + right, len(first_made))
    return [-float(first_made.get(token, len(tokens))) for token in tokens]


def tokenizer_metadata(tokenizer: Tokenizer | None, config: ModelConfig) -> dict[str, tuple[int, Any]]:
    """tokenizer.* keys: the vocabulary in id order (padded with unused [PADn] tokens up to the model's
    vocabulary, as llama.cpp's converter pads), token types, merges (byte-level BPE) or scores and the space prefix
    (SentencePiece-style BPE), special ids, add_bos, chat template."""
    if tokenizer is None:
        raise SparkGPTError("GGUF export needs the model's tokenizer (a GGUF file carries it); this model has none")
    state = json.loads(tokenizer.backend.to_str())
    model = state["model"]
    if model.get("type") != "BPE":
        why = " (llama.cpp's SentencePiece tokenizer merges pieces by score, which gives other ids than a Unigram " \
            "model's most likely split)" if model.get("type") == "Unigram" else ""
        raise SparkGPTError(f"GGUF export supports byte-level BPE and SentencePiece-style BPE tokenizers; this one is "
                            f"{model.get('type')}{why}")
    merges = [tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge) for merge in model["merges"]]
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= config.vocab_size:
        raise SparkGPTError(f"the tokenizer has token id {max(vocab.values())} but the model's vocabulary has only "
                            f"{config.vocab_size} rows")
    space_prefix = _sentencepiece_space_prefix(state)
    unknown = tokenizer.token_to_id(model.get("unk_token"))
    tokens = [f"[PAD{i}]" for i in range(config.vocab_size)]
    token_types = [UNUSED_TOKEN] * config.vocab_size
    for token, index in vocab.items():
        tokens[index], token_types[index] = token, NORMAL_TOKEN
        if space_prefix is not None and _BYTE_TOKEN.fullmatch(token):
            token_types[index] = BYTE_TOKEN  # llama.cpp spells a piece missing from the vocabulary with these
    if space_prefix is not None and unknown is not None:
        token_types[unknown] = UNKNOWN_TOKEN  # unless it is an added token, as llama.cpp's converter decides
    for index, added in tokenizer.backend.get_added_tokens_decoder().items():
        token_types[index] = CONTROL_TOKEN if added.special else USER_DEFINED_TOKEN
    if space_prefix is None:
        metadata: dict[str, tuple[int, Any]] = {
            "tokenizer.ggml.model": (STRING, "gpt2"),
            "tokenizer.ggml.pre": (STRING, _pre_tokenizer_name(state.get("pre_tokenizer"))),
            "tokenizer.ggml.tokens": ((ARRAY, STRING), tokens),
            "tokenizer.ggml.token_type": ((ARRAY, INT32), token_types),
            "tokenizer.ggml.merges": ((ARRAY, STRING), [" ".join(merge) for merge in merges]),
        }
    else:
        missing = [f"<0x{byte:02X}>" for byte in range(256) if f"<0x{byte:02X}>" not in vocab]
        if missing:
            raise SparkGPTError(f"GGUF export: this SentencePiece-style tokenizer falls back to bytes but lacks "
                                f"{len(missing)} byte token(s) ({', '.join(missing[:3])}, ...), which llama.cpp needs")
        metadata = {
            "tokenizer.ggml.model": (STRING, "llama"),
            "tokenizer.ggml.pre": (STRING, "default"),
            "tokenizer.ggml.tokens": ((ARRAY, STRING), tokens),
            "tokenizer.ggml.scores": ((ARRAY, FLOAT32), _scores_from_merges(tokens, merges)),
            "tokenizer.ggml.token_type": ((ARRAY, INT32), token_types),
            "tokenizer.ggml.add_space_prefix": (BOOL, space_prefix),
        }
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    special_ids = {
        "bos": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else config.bos_token_id,
        "eos": tokenizer.eos_token_id if tokenizer.eos_token_id is not None else eos,
        "unknown": unknown,
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
