"""Structured output: a request's grammar (a JSON schema, any JSON object, a regex, a choice of strings) compiled by
llguidance into a matcher that says, before each token, which tokens keep the text inside the grammar.

A grammar is compiled where the request is read (the API's text thread), so a schema the grammar engine cannot
enforce (an unimplemented keyword, a `$ref` that does not resolve, a bad regex) is refused before anything is
generated: it never turns into unconstrained output. The engine copies the compiled matcher for each choice, asks
it for the allowed tokens before each sample (`allowed_tokens`) and feeds it each sampled token.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Collection, Sequence
from typing import Any

import llguidance
import numpy as np
import tokenizers
import torch

from sparkgpt.errors import SparkGPTError
from sparkgpt.tokenizer import Tokenizer

# Compact JSON: with flexible whitespace a model may wander into endless blanks, and no client needs them.
JSON_OPTIONS: llguidance.JsonCompileOptions = {"whitespace_flexible": False}
GRAMMAR_END = "<|sparkgpt-grammar-end|>"  # the end token llguidance needs, for a model that has no stop token


class GrammarError(SparkGPTError):
    """A grammar that cannot be enforced: an invalid or unsupported schema, an unresolvable `$ref`, a bad regex."""


def json_schema_grammar(schema: dict[str, Any] | bool) -> str:
    """The grammar of the JSON texts a schema accepts (compact: no whitespace between tokens)."""
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    except ValueError as error:
        raise GrammarError(str(error)) from None


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's `{"type": "json_object"}`)."""
    return json_schema_grammar({"type": "object"})


def regex_grammar(pattern: str) -> str:
    """The strings a regex (Rust `regex` syntax, as vLLM's engines take) matches whole."""
    return llguidance.LLMatcher.grammar_from_regex(pattern)


def choice_grammar(choices: Sequence[str]) -> str:
    """Exactly one of the given strings."""
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(choice) for choice in choices))


def lark_grammar(grammar: str) -> str:
    """A context-free grammar in Lark or GBNF syntax (vLLM's `grammar`)."""
    try:
        return llguidance.grammar_from("grammar", grammar)
    except ValueError as error:
        raise GrammarError(str(error)) from None


class Grammar:
    """A compiled grammar; `matcher()` gives one choice its own state (a cheap copy of the compiled one)."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def matcher(self) -> llguidance.LLMatcher:
        return self._matcher.deep_copy()


class GrammarCompiler:
    """Compiles grammars for one model's tokenizer. The llguidance view of the tokenizer (every token's bytes) is
    built at the first grammar, not at start-up: a server that never sees one never pays for it."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Collection[int]) -> None:
        self.tokenizer, self.vocab_size, self.stop_token_ids = tokenizer, vocab_size, sorted(stop_token_ids)
        self.virtual_end: int | None = None  # GRAMMAR_END's id, when the model has no stop token of its own
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                backend = tokenizers.Tokenizer.from_str(self.tokenizer.backend.to_str())
                ends = self.stop_token_ids
                if not ends:  # llguidance wants an end token: one no model row can sample, masked out below
                    backend.add_special_tokens([GRAMMAR_END])
                    self.virtual_end = backend.token_to_id(GRAMMAR_END)
                    ends = [self.virtual_end]
                self._ll_tokenizer = llguidance.LLTokenizer(
                    backend.to_str(), n_vocab=max(self.vocab_size, backend.get_vocab_size()), eos_token=ends)
            return self._ll_tokenizer

    def compile(self, grammar: str) -> Grammar:
        """Raise GrammarError unless llguidance can enforce `grammar` (from one of the `*_grammar` functions)."""
        matcher = llguidance.LLMatcher(self.ll_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return Grammar(matcher)

    def allowed_tokens(self, matchers: Sequence[llguidance.LLMatcher]) -> torch.Tensor:
        """Which tokens of the model's vocabulary each matcher allows next: a bool [len(matchers), vocab_size]."""
        words = (self.ll_tokenizer().vocab_size + 31) // 32
        bitmask = np.empty((len(matchers), words), dtype=np.int32)
        for row, matcher in enumerate(matchers):
            matcher.unsafe_compute_mask_ptr(bitmask[row].ctypes.data, words * 4)
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :self.vocab_size]
        allowed = torch.from_numpy(bits.astype(bool))
        if self.virtual_end is not None and self.virtual_end < self.vocab_size:
            allowed[:, self.virtual_end] = False  # a padded id of the model's: not an end it knows
        return allowed
