"""The serving engine: continuous batching over a preallocated, slotted KV cache. It schedules; no HTTP here.

One scheduler thread owns the model and the cache. Every active sequence holds a *slot*: one row of a cache
[layers, slots, kv_heads, context, head_dim]. Each loop iteration

1. takes in new requests and aborts (from any thread, through a queue),
2. gives waiting sequences free slots, and prefills the newcomers together in one forward (their prompts
   left-padded, each row's keys/values written straight into its own slot), at most `prefill_chunk` tokens,
   padding included, per iteration, so a long prompt or a crowd of newcomers never stalls the others for long,
3. runs one batched decode step over every decoding slot (the lean step generation uses, `sparkgpt/model/
   decode.py`): each row feeds its last token at its own position, writes its key/value at its own column, and
   attends to its own columns only (a [slots, 1, 1, span] mask),
4. samples every row with its own request's parameters and seed through generation's one `Sampler`, turns each
   token into text and a finish reason with the request's `StopRule`, and hands the text to the request's sink.

A request may ask for log-probabilities (`TokenLogprob`: the log-softmax of the model's raw logits, before any
sampling parameter, as vLLM reports by default): of each sampled token, computed in the batched step for the rows
that asked only; and of its prompt's tokens, from every position of its prefill (such a prompt is computed whole,
never copied from another slot, whose logits are gone). A score-only request (max_tokens 0) samples nothing.

A request may carry a grammar (`constraints.py`: a JSON schema, a regex, a choice), compiled before it is submitted.
Each of its choices then gets its own matcher: before each sample (prefill's first and every decode step) the
tokens the grammar forbids are set to -inf in that row's logits, and the sampled token is fed to the matcher; once
the grammar can go no further the choice ends with "stop". Rows without a grammar pay nothing, and their logits are
left as they were (log-probabilities are the raw logits' for every row).

Sequences join between steps and leave the moment they finish, so a short request never waits for a long one.
Slot rows never mix (attention is masked per row, every other op is row-wise), so each sequence computes what it
would alone, up to floating-point rounding of batched matrix products; at temperature 0 the tests find its text
equal to the solo text. A newcomer whose prompt starts like one a slot already holds (a shared system prompt, the
earlier turns of a conversation) copies those keys/values instead of recomputing them. The slot cache lives in
`slots.py`, the model's CPU weight layout in `sparkgpt.model.decode` (`batched_decode_layout`), sampling and stop
rules in `sparkgpt.generate`: choice i of a request seeded s draws what `LM.generate(seed=s + i)` draws.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sparkgpt import hardware
from sparkgpt.data.batch import pad_rows
from sparkgpt.errors import SparkGPTError
from sparkgpt.generate import (
    FAILED,
    Completion,
    Sampler,
    SamplingParamError,
    SamplingParams,
    StopRule,
    greedy_tokens,
    prompt_lookup_draft,
)
from sparkgpt.lm import LM
from sparkgpt.model.decode import batched_decode_layout, decode_step
from sparkgpt.model.quant import DECODE_ROWS
from sparkgpt.serve.constraints import Grammar, GrammarCompiler
from sparkgpt.serve.prefix_cache import PrefixCache
from sparkgpt.serve.slots import SlotKVCache


class QueueFull(SparkGPTError):
    """Every slot is busy and the waiting line is at its limit (requests, or tokens of queued work)."""


class ShuttingDown(SparkGPTError):
    """The server is draining for shutdown: requests in flight finish, new ones are refused (503)."""


class EngineDead(SparkGPTError):
    """The engine's thread has stopped on an error (`Engine.error`): nothing more can be generated."""


class ContextLengthExceeded(SparkGPTError):
    """The prompt plus the tokens asked for do not fit one slot of the cache."""


MAX_TOP_LOGPROBS = 20  # alternatives per token at most (OpenAI's limit)
# Tokens per prefix-cache block (vLLM's block size): prompts that part ways inside a block share its first tokens
# by a copy, and a lookup walks one dict per block.
PREFIX_BLOCK_TOKENS = 16
# Draft tokens a greedy sequence may have checked per step (speculative decoding by prompt lookup).
SPECULATIVE_TOKENS = 8


@dataclass
class TokenLogprob:
    """A token's log-probability under the model's raw logits at its step, and the `top` likeliest tokens there as
    (token, log-probability), likeliest first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class ChoiceEvent:
    """What one choice (sequence) of a request did in one engine step."""

    index: int                      # which of the request's n choices
    text: str = ""                  # newly released text, whole UTF-8 characters, never past a stop string
    finish_reason: str | None = None  # "stop" or "length" once the choice is done
    completion_tokens: int = 0      # tokens sampled for this choice so far
    error: str | None = None        # set when the engine failed this choice (then finish_reason is None)
    code: str | None = None         # the error's kind: "numerical_error" (this choice's logits), "engine_error"
    # Asked for only: the token sampled in this step (a stop token too, as vLLM reports it), and with a choice's
    # first event its prompt's tokens (the first None: nothing predicts it).
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    token_ids: list[int] | None = None  # with the finishing event: every token sampled (an end token included)


EventSink = Callable[[list[ChoiceEvent]], None]


@dataclass(eq=False)
class EngineRequest:
    """A submitted prompt with its sampling parameters and n choices; events go to `sink` (engine thread)."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    n: int
    sink: EventSink
    logprobs: int | None = None         # alternatives per sampled token's log-probability; None: not asked
    prompt_logprobs: int | None = None  # alternatives per prompt token's log-probability; None: not asked
    score_only: bool = False            # max_tokens 0: prefill (for prompt_logprobs), sample nothing
    grammar: Grammar | None = None      # what every choice's text must match; None: free text
    choices_to_start: deque[int] = field(default_factory=deque)
    started: bool = False           # has any choice been given a slot (no longer counts as queued)
    running: int = 0                # choices holding a slot now
    aborted: bool = False


@dataclass(eq=False)
class _Sequence:
    """One choice being generated: its slot (also its row of the sampler), how much of its prompt is cached, and
    its stop rule (which holds its text so far)."""

    request: EngineRequest
    index: int
    slot: int
    stop: StopRule
    cached: int = 0                 # tokens whose keys/values are in the slot (columns 0..cached-1)
    next_token: int = -1            # sampled but not yet fed to the model
    fed: list[int] = field(default_factory=list)  # the generated tokens fed back (their keys/values are cached)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # filled by the prefill, sent with the first event
    matcher: Any = None             # this choice's grammar state (an llguidance LLMatcher); None: unconstrained
    # Draft tokens its next step may check: two more than its last draft kept, so a text that copies its input
    # drafts long and one that does not wastes few rows on guesses.
    draft_limit: int = 4


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], tops: Sequence[int]) -> list[TokenLogprob]:
    """Row r's token tokens[r] under the log-softmax of logits [rows, vocab] (float32), with its tops[r] likeliest
    tokens: one normalisation and one top-k for all rows."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    most = max(tops)
    if most:
        values, ids = logprobs.topk(min(most, logprobs.shape[-1]), dim=-1)
        values, ids = values.tolist(), ids.tolist()
    return [TokenLogprob(token, logprob, list(zip(ids[row][:top], values[row][:top], strict=True)) if top else [])
            for row, (token, logprob, top) in enumerate(zip(tokens, chosen, tops, strict=True))]


class Engine:
    """Continuous batching for one LM: `submit` from any thread, events arrive at each request's sink.

    max_slots: sequences decoded together (each holds one cache row); max_queue: requests that may wait for a
    slot before `submit` refuses with QueueFull; max_queued_tokens: the queued work (n × max_tokens of every
    choice not yet in a slot) beyond which `submit` refuses too, unless nothing is queued (default: four times
    what all slots hold, max_slots × context × 4); context: cache columns per slot (prompt + max_tokens limit);
    prefill_chunk: prompt tokens (padding included) prefilled per loop iteration at most; prefix_cache_bytes: the
    memory for keys/values kept after their sequences end (`PrefixCache`; default: a quarter of the slots' cache,
    so serving holds at most 1.25 times the slots' memory; 0: none), which a prompt that starts the same way (a
    conversation's earlier turns and replies, a shared system prompt) copies instead of computing again;
    speculative_tokens: draft tokens a greedy choice may have checked per decode step (0: none), guessed by prompt
    lookup, which a summary or a correction, repeating its input, mostly gets right: lossless, and fewer steps.

    Free slots go to the waiting request with the fewest choices running (the oldest among equals), one choice at
    a time: a request of n=48 takes the slots no one else waits for, and a small request behind it gets the next
    free slot rather than waiting for all 48 to start.

    A choice whose logits turn NaN or infinite ends alone, with an error event (code "numerical_error"); the
    others go on as they would alone. Should the engine thread itself die, `alive` turns False, `error` says
    why, every request in flight gets an error event, and `submit` raises EngineDead.

    The engine decodes with the model laid out for batched rows (`batched_decode_layout`: on a CPU, its own copy
    with column-major Linear weights and a oneDNN output head); the caller's model is left as it was, and the
    engine keeps no reference to it (`lm` is an LM over the engine's model, for the tokenizer and chat template).
    While the caller keeps its own LM, its Linear weights are held twice: drop it to serve in one copy's memory.
    """

    def __init__(
        self, lm: LM, max_slots: int = 8, max_queue: int = 64, context: int | None = None, prefill_chunk: int = 256,
        max_queued_tokens: int | None = None, prefix_cache_bytes: int | None = None,
        speculative_tokens: int = SPECULATIVE_TOKENS,
    ) -> None:
        if lm.tokenizer is None:
            raise SparkGPTError("this model has no tokenizer (its checkpoint lacks tokenizer.json); it cannot serve")
        if max_slots < 1 or max_queue < 0 or prefill_chunk < 1:
            raise SparkGPTError("max_slots and prefill_chunk must be >= 1 and max_queue >= 0")
        if getattr(lm.config, "architecture", "decoder") != "decoder":
            raise SparkGPTError("serving needs a decoder-only (GPT) model; this one is "
                                f"{lm.config.architecture!r}")
        patterns = getattr(lm.config, "layer_patterns", None)
        if patterns is not None and any(pattern != "dense" for pattern in patterns()):
            # Windowed layers keep ring buffers per sequence, which the slotted cache does not have (yet).
            raise SparkGPTError("serving supports dense-attention models only; this one has sparse layers")
        self.max_slots, self.max_queue, self.prefill_chunk = max_slots, max_queue, prefill_chunk
        self.context = min(context or lm.config.max_seq_len, lm.config.max_seq_len)
        if self.context < 2:
            raise SparkGPTError(f"context must be at least 2 tokens, got {self.context}")
        self.max_queued_tokens = max_queued_tokens if max_queued_tokens is not None else 4 * max_slots * self.context
        if self.max_queued_tokens < 1:
            raise SparkGPTError("max_queued_tokens must be >= 1")
        self.model = batched_decode_layout(lm.model)
        self.lm = LM(self.model, lm.tokenizer)
        self.tokenizer, self.config = lm.tokenizer, lm.config
        self.stop_token_ids = frozenset(lm.stop_token_ids())
        weight = self.model.token_embedding.weight
        self.device = weight.device
        self.cache = SlotKVCache(lm.config, max_slots, self.context, weight.dtype, weight.device)
        if prefix_cache_bytes is None:
            prefix_cache_bytes = 2 * self.cache.keys.numel() * self.cache.keys.element_size() // 4
        if prefix_cache_bytes < 0:
            raise SparkGPTError("prefix_cache_bytes must be >= 0")
        self.prefixes = PrefixCache(PREFIX_BLOCK_TOKENS, prefix_cache_bytes)
        self.step = decode_step(self.model)  # the lean decode step generate uses, where it covers the model
        self.sampler = Sampler(max_slots, lm.config.vocab_size, self.device)  # row r samples for slot r
        self.grammars = GrammarCompiler(lm.tokenizer, lm.config.vocab_size, self.stop_token_ids)

        self._inbox: queue.SimpleQueue[tuple[str, EngineRequest | float | None]] = queue.SimpleQueue()
        self._ids = itertools.count()
        self._lock = threading.Lock()   # guards the counters below, read by submit() in other threads
        self._unstarted = 0             # submitted requests none of whose choices holds a slot yet
        self._queued_sequences = 0      # submitted choices not yet given a slot
        self._queued_tokens = 0         # their max_tokens, summed
        self._busy_slots = 0
        self.error: str | None = None   # why the engine thread died, if it did
        self.draining = False           # drain() was called: submit() refuses
        self._drain_deadline: float | None = None
        # Scheduler state, touched only by the engine thread.
        self._waiting: deque[EngineRequest] = deque()
        self._prefilling: deque[_Sequence] = deque()
        self._decoding: dict[int, _Sequence] = {}
        self._free_slots = list(range(max_slots))
        self.reused_prompt_tokens = 0   # prompt tokens whose keys/values were copied from the prefix cache
        self.speculative_tokens = speculative_tokens
        self.drafted_tokens = 0         # draft tokens checked, and those accepted (speculative decoding)
        self.accepted_tokens = 0
        self._outbox: dict[EngineRequest, list[ChoiceEvent]] = {}
        self._thread: threading.Thread | None = None
        self.steps = 0                  # decode steps run (for metrics and tests)
        self.prefills = 0               # prefill forwards run (each takes every newcomer that fits its budget)
        self.aborted_sequences = 0

    # ---- any thread -------------------------------------------------------------------------------------------

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sparkgpt-engine", daemon=True)
            self._thread.start()
            hardware.release_idle_threads()  # the engine thread computes from now on, not the caller
        return self

    @property
    def alive(self) -> bool:
        """The engine thread runs (started, not stopped, not dead of an error)."""
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def drain(self, seconds: float) -> None:
        """Refuse new requests from now on; let those in flight run for up to `seconds`, then end them with a
        `server_shutting_down` error (a stream still ends properly, with an error event and [DONE])."""
        self.draining = True
        self._inbox.put(("drain", time.monotonic() + seconds))

    @property
    def busy(self) -> bool:
        """Requests are queued, prefilling or decoding (read from another thread: a snapshot)."""
        return bool(self._waiting or self._prefilling or self._decoding or not self._inbox.empty())

    def stop(self) -> None:
        if self._thread is not None:
            self._inbox.put(("stop", None))
            self._thread.join()
            self._thread = None

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise ContextLengthExceeded unless the prompt and max_tokens new tokens fit one slot."""
        if prompt_tokens + max_tokens > self.context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.context} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the completion)."
                " Please reduce the length of the prompt or max_tokens."
            )

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, sink: EventSink, n: int = 1,
               logprobs: int | None = None, prompt_logprobs: int | None = None,
               score_only: bool = False, grammar: Grammar | None = None) -> EngineRequest:
        """Queue a request of n choices; raise ContextLengthExceeded, QueueFull or EngineDead at once rather than
        later. `logprobs` / `prompt_logprobs` (0..MAX_TOP_LOGPROBS alternatives) ask for the log-probabilities of
        the sampled / prompt tokens; `score_only` samples nothing (params.max_new_tokens is then ignored); a
        `grammar` (compiled by `self.grammars`) constrains every choice's text."""
        if self.error is not None:
            raise EngineDead(f"the engine has stopped: {self.error}")
        if self.draining:
            raise ShuttingDown("the server is shutting down: it finishes the requests in flight and takes no new ones")
        if not prompt_ids:
            raise SparkGPTError("the prompt is empty")
        if n < 1:
            raise SparkGPTError(f"n must be >= 1, got {n}")
        for name, top in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
                raise SparkGPTError(f"{name} must be from 0 to {MAX_TOP_LOGPROBS}, got {top}")
        self.check_fits(len(prompt_ids), 0 if score_only else params.max_new_tokens)
        if params.logit_bias and max(params.logit_bias) >= self.config.vocab_size:  # else the sampler refuses it
            raise SamplingParamError("logit_bias", f"logit_bias names the token id {max(params.logit_bias)}, "
                                                   f"outside the vocabulary [0, {self.config.vocab_size})")
        request = EngineRequest(next(self._ids), list(prompt_ids), params, n, sink, logprobs, prompt_logprobs,
                                score_only, grammar, deque(range(n)))
        tokens = n * params.max_new_tokens
        with self._lock:
            free = self.max_slots - self._busy_slots
            if self._unstarted + 1 - free > self.max_queue:
                raise QueueFull(f"the server is busy: {self.max_slots} sequences running and "
                                f"{self.max_queue} requests waiting; try again later")
            if self._queued_tokens and self._queued_tokens + tokens > self.max_queued_tokens:
                raise QueueFull(f"the server is busy: {self._queued_sequences} sequences wait for a slot with "
                                f"{self._queued_tokens} tokens to generate, and this request's {n} × "
                                f"{params.max_new_tokens} would pass the limit of {self.max_queued_tokens}; "
                                "try again later")
            self._unstarted += 1
            self._queued_sequences += n
            self._queued_tokens += tokens
        self._inbox.put(("submit", request))
        if self.error is not None:  # it died meanwhile, maybe after emptying the inbox: nobody will answer
            raise EngineDead(f"the engine has stopped: {self.error}")
        return request

    def abort(self, request: EngineRequest) -> None:
        """Stop a request's choices and free their slots (a client went away). Safe to call twice or late."""
        self._inbox.put(("abort", request))

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        with self._lock:
            return max(0, self._unstarted - (self.max_slots - self._busy_slots))

    @property
    def queued_sequences(self) -> int:
        """Choices (sequences) waiting for a slot."""
        with self._lock:
            return self._queued_sequences

    @property
    def queued_tokens(self) -> int:
        """The tokens the waiting choices may generate (n × max_tokens, summed)."""
        with self._lock:
            return self._queued_tokens

    @property
    def prefix_cache_bytes(self) -> int:
        """Memory the prefix cache holds now."""
        return self.prefixes.bytes

    @property
    def active_sequences(self) -> int:
        with self._lock:
            return self._busy_slots

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, n: int = 1,
                 timeout: float | None = None) -> list[Completion]:
        """Blocking convenience (for scripts and tests): the n completions of one prompt."""
        events: queue.SimpleQueue[list[ChoiceEvent]] = queue.SimpleQueue()
        self.submit(prompt_ids, params, events.put, n)
        texts: list[str] = [""] * n
        reasons: list[str | None] = [None] * n
        tokens: list[list[int]] = [[] for _ in range(n)]
        while any(reason is None for reason in reasons):
            for event in events.get(timeout=timeout):
                if event.error is not None:
                    raise SparkGPTError(event.error)
                texts[event.index] += event.text
                reasons[event.index] = event.finish_reason
                tokens[event.index] = event.token_ids or tokens[event.index]
        return [Completion(text, ids, len(prompt_ids), reason or "stop")
                for text, ids, reason in zip(texts, tokens, reasons, strict=True)]

    # ---- the engine thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    idle = not (self._waiting or self._prefilling or self._decoding)
                    if idle:  # another thread may compute while this one waits (hardware.release_idle_threads)
                        hardware.release_idle_threads()
                    if not self._take_commands(block=idle):
                        return
                    if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                        self._end_all("the server is shutting down and this request ran past its shutdown timeout",
                                      code="server_shutting_down")
                    self._admit()
                    try:
                        self._prefill()
                        self._decode_step()
                    except Exception as error:  # a failed forward (out of memory, say): fail those sequences, go on
                        self._fail_all(f"the engine failed: {type(error).__name__}: {error}")
                    self._deliver()
        except BaseException as error:  # a bug in the scheduler itself: say so, and end every request in flight
            self._die(f"{type(error).__name__}: {error}")
            raise

    def _die(self, reason: str) -> None:
        """The engine thread is ending on an error: every request submitted, waiting or running, gets an error
        event for each of its unfinished choices, and submit() refuses from now on."""
        self.error = reason
        message = f"the engine stopped: {reason}"
        with contextlib.suppress(Exception):
            self._fail_all(message)
        with contextlib.suppress(Exception):
            while True:  # requests still in the inbox were never seen by the scheduler
                try:
                    command, request = self._inbox.get(block=False)
                except queue.Empty:
                    break
                if command == "submit":
                    self._waiting.append(request)
            self._fail_waiting(message, code="engine_error")
            self._deliver()

    def _take_commands(self, block: bool) -> bool:
        """Apply every queued submit/abort; False once asked to stop."""
        while True:
            try:
                command, request = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if command == "stop":
                return False
            if command == "drain":
                self._drain_deadline = request
            elif command == "submit":
                self._waiting.append(request)
            elif command == "abort":
                self._abort(request)

    def _abort(self, request: EngineRequest) -> None:
        if request.aborted:
            return
        request.aborted = True
        self._outbox.pop(request, None)
        if request in self._waiting:
            self._waiting.remove(request)
        if request.choices_to_start:
            with self._lock:
                self._queued_sequences -= len(request.choices_to_start)
                self._queued_tokens -= len(request.choices_to_start) * request.params.max_new_tokens
            request.choices_to_start.clear()
        if not request.started:
            with self._lock:
                self._unstarted -= 1
            request.started = True
        for sequence in [*self._prefilling, *self._decoding.values()]:
            if sequence.request is request:
                self.aborted_sequences += 1
                self._release(sequence)

    def _admit(self) -> None:
        """Give free slots to waiting choices, one at a time, each to the waiting request with the fewest choices
        running (the oldest of those): a small request never waits for all the choices of a big one to start."""
        while self._free_slots and self._waiting:
            request = min(self._waiting, key=lambda waiting: waiting.running)  # min: the first (oldest) of equals
            index = request.choices_to_start.popleft()
            if not request.choices_to_start:
                self._waiting.remove(request)
            slot = min(self._free_slots)  # low slots first keeps the decode batch (rows 0..highest) short
            self._free_slots.remove(slot)
            with self._lock:
                self._busy_slots += 1
                self._queued_sequences -= 1
                self._queued_tokens -= request.params.max_new_tokens
                if not request.started:
                    self._unstarted -= 1
            request.started = True
            request.running += 1
            params = request.params
            # Choice i of a request seeded s draws as a generation seeded s + i (choice 0: as one seeded s).
            self.sampler.start(slot, params, None if params.seed is None else params.seed + index, request.prompt_ids)
            sequence = _Sequence(request, index, slot, StopRule(self.tokenizer, params, self.stop_token_ids))
            if request.grammar is not None:
                sequence.matcher = request.grammar.matcher()
            if request.prompt_logprobs is None:
                sequence.cached = self._reuse_prefix(slot, request.prompt_ids)
            else:  # every prompt position's logits are needed, so nothing is copied
                sequence.prompt_logprobs = [None]
            self._prefilling.append(sequence)

    def _reuse_prefix(self, slot: int, prompt: list[int]) -> int:
        """Copy into `slot` the cached keys/values of the longest prefix of `prompt` the prefix cache holds (the
        last prompt token is always computed: its logits give the first new token); return its length."""
        length, path = self.prefixes.longest(prompt, len(prompt) - 1)
        self.prefixes.copy_into(path, self.cache.keys[:, slot], self.cache.values[:, slot])
        self.reused_prompt_tokens += length
        return length

    def _keep(self, sequence: _Sequence) -> None:
        """Put what the sequence's slot holds (its prompt and the tokens fed back so far) into the prefix cache."""
        tokens = sequence.request.prompt_ids + sequence.fed
        self.prefixes.insert(tokens[:sequence.cached], self.cache.keys[:, sequence.slot],
                             self.cache.values[:, sequence.slot])

    def _finish(self, sequence: _Sequence) -> None:
        """The sequence ended normally: keep its keys/values for later prompts, and free its slot."""
        self._keep(sequence)
        self._release(sequence)

    def _release(self, sequence: _Sequence) -> None:
        if sequence in self._prefilling:
            self._prefilling.remove(sequence)
        self._decoding.pop(sequence.slot, None)
        self._free_slots.append(sequence.slot)
        sequence.request.running -= 1
        with self._lock:
            self._busy_slots -= 1

    def _prefill_rows(self) -> list[tuple[_Sequence, int]]:
        """This iteration's prefill: (newcomer, prompt tokens it prefills now), oldest first.

        The rows go through one forward, left-padded to the longest chunk, so it computes rows × width tokens,
        padding included; that is what `prefill_chunk` caps. One iteration's prefill therefore costs at most
        `prefill_chunk` tokens of compute (256 by default: a few decode steps' worth for SmolLM2-135M) however many
        newcomers arrive and however long their prompts: a long prompt is prefilled a chunk per iteration, with a
        decode step for the others in between. A newcomer that would widen the batch past the budget takes a chunk
        of the current width, or waits for the next iteration. Newcomers go together because one forward over
        several short prompts costs little more than one (RESULTS.md, "Figures behind choices in the code")."""
        rows: list[tuple[_Sequence, int]] = []
        width = 0
        for sequence in self._prefilling:
            remaining = len(sequence.request.prompt_ids) - sequence.cached
            wider = max(width, min(remaining, self.prefill_chunk))
            if (len(rows) + 1) * wider <= self.prefill_chunk:
                width = wider
            elif (len(rows) + 1) * width > self.prefill_chunk:
                break
            rows.append((sequence, min(remaining, width)))
        return rows

    def _prefill(self) -> None:
        """Prefill this iteration's newcomers together, in one forward: row r's chunk is left-padded, its tokens
        take positions cached_r, cached_r + 1, ... and write their keys/values into its own slot at those columns;
        each token sees its own slot's columns up to itself. Padding writes the scratch column and sees column 0
        alone (finite numbers: its unused output stays finite). A short chunk that continues a cached prefix (a
        chat turn's new tokens) goes through the lean decode step instead (`_prefill_through_step`). Each newcomer
        whose prompt is then complete samples its first token."""
        rows = self._prefill_rows()
        if not rows:
            return
        try:
            logits = self._prefill_logits(rows)
        except Exception as error:
            for sequence, _ in rows:
                self._fail(sequence, f"prefill failed: {type(error).__name__}: {error}")
            return
        self.prefills += 1
        finished: list[int] = []
        for row, (sequence, count) in enumerate(rows):
            sequence.cached += count
            if sequence.cached < len(sequence.request.prompt_ids):
                continue  # the rest of its prompt next iteration, after a decode step
            if any(math.isnan(entry.logprob) for entry in (sequence.prompt_logprobs or [])[1:]):
                self._fail_numerically(sequence)  # NaN scores are no answer (and not JSON)
            elif not sequence.request.score_only:
                finished.append(row)
            else:  # scored: done without a token
                self._outbox.setdefault(sequence.request, []).append(
                    ChoiceEvent(sequence.index, finish_reason="length", prompt_logprobs=sequence.prompt_logprobs))
                self._release(sequence)
        sequences = [rows[row][0] for row in finished]
        last = logits[finished, -1].float()
        picks = self.sampler.sample(self._constrained(last, sequences), [sequence.slot for sequence in sequences])
        picks = picks.tolist()
        for sequence, token, logprob in zip(sequences, picks, self._sampled_logprobs(last, sequences, picks),
                                            strict=True):
            if token == FAILED:
                self._fail_numerically(sequence)
                continue
            self._prefilling.remove(sequence)
            if self._accept(sequence, token, logprob):
                self._decoding[sequence.slot] = sequence
                if sequence.index == 0:  # the prompt, for the request's other choices and later requests
                    self._keep(sequence)
            else:
                self._finish(sequence)  # done at its first token (max_tokens 1, or an end token)

    def _prefill_logits(self, rows: list[tuple[_Sequence, int]]) -> torch.Tensor:
        """Logits [rows, 1, vocab] after each row's chunk. Which way a row goes depends on its own request alone,
        never on who else arrived with it, so that its text does not depend on other traffic: a chunk of up to
        DECODE_ROWS tokens after a cached prefix, unscored, through the lean step (in passes of at most DECODE_ROWS
        rows); the rest through one forward. A prompt with nothing cached always takes the forward, as generating
        it alone does (`generate.token_steps`), so each request's text at temperature 0 equals its solo text."""
        stepped = [row for row, (sequence, count) in enumerate(rows)
                   if self.step is not None and sequence.cached > 0 and count <= DECODE_ROWS
                   and sequence.prompt_logprobs is None]
        logits: list[torch.Tensor | None] = [None] * len(rows)
        passes: list[list[int]] = []
        for row in stepped:
            if not passes or sum(rows[r][1] for r in passes[-1]) + rows[row][1] > DECODE_ROWS:
                passes.append([])
            passes[-1].append(row)
        for chosen in passes:
            for row, row_logits in zip(chosen, self._prefill_through_step([rows[r] for r in chosen]), strict=True):
                logits[row] = row_logits
        forward = [row for row in range(len(rows)) if logits[row] is None]
        if forward:
            subset = [rows[row] for row in forward]
            scoring = [index for index, (sequence, _) in enumerate(subset) if sequence.prompt_logprobs is not None]
            for row, row_logits in zip(forward, self._prefill_through_forward(subset, scoring), strict=True):
                logits[row] = row_logits
        return torch.stack([row_logits.float() for row_logits in logits])

    def _prefill_through_forward(self, rows: list[tuple[_Sequence, int]], scoring: list[int]) -> torch.Tensor:
        """Logits [rows, 1, vocab] after each row's chunk (every position's, [rows, width, vocab], where prompts are
        scored), through the model's forward: the chunks left-padded into one batch."""
        tokens, real = pad_rows([sequence.request.prompt_ids[sequence.cached:][:count] for sequence, count in rows],
                                left=True)
        width = tokens.shape[1]
        starts = torch.tensor([sequence.cached - (width - count) for sequence, count in rows])
        offsets = torch.arange(width)
        padding = real == 0
        positions = (starts[:, None] + offsets[None, :]).masked_fill(padding, 0)
        columns = positions.masked_fill(padding, self.cache.scratch_column)
        span = int(positions.max()) + 1
        mask = torch.arange(span)[None, None, :] <= positions[:, :, None]  # [rows, width, span]
        device = self.device
        self.cache.begin(torch.tensor([sequence.slot for sequence, _ in rows], device=device), columns.to(device),
                         span)
        options = dict(positions=positions.to(device), attention_mask=mask.to(device)[:, None], cache=self.cache)
        # Scoring needs every position's logits: the model's own forward gives them (whatever it does after its
        # head, a soft cap say), at the price of the head over this one chunk's other positions too.
        logits = self.model(tokens.to(device), **options, last_only=not scoring)
        if scoring:
            self._score_prompts([rows[row] for row in scoring], logits[scoring])
            logits = logits[:, -1:]
        return logits

    def _prefill_through_step(self, rows: list[tuple[_Sequence, int]]) -> torch.Tensor:
        """Logits [rows, 1, vocab] after each row's chunk, through the lean decode step as drafts are checked: every
        chunk token one step row in its sequence's slot, at its own position, seeing its slot's columns up to
        itself. A chat turn's few new tokens (the template's system prompt comes from the prefix cache) cost about
        half of what the model's general forward spends on them (RESULTS.md, "Serving")."""
        tokens, positions, row_slots, last_rows = [], [], [], []
        for sequence, count in rows:
            tokens += sequence.request.prompt_ids[sequence.cached:sequence.cached + count]
            positions += range(sequence.cached, sequence.cached + count)
            row_slots += [sequence.slot] * count
            last_rows.append(len(tokens) - 1)
        return self._step_rows(tokens, positions, positions, row_slots, last_rows)[:, None]

    def _step_rows(self, tokens: list[int], positions: list[int], columns: list[int], row_slots: list[int] | None,
                   logit_rows: list[int] | None = None) -> torch.Tensor:
        """Logits [rows (or len(logit_rows)), vocab] of one pass where row r feeds tokens[r] at positions[r],
        writes its key/value at columns[r] of slot row_slots[r] (None: slot r) and sees its slot's columns up to
        its position: through the lean decode step, or the model's own forward where the step does not cover it
        (sinusoidal positions, no final norm, ...)."""
        device = self.device
        span = max(positions) + 1
        positions_tensor = torch.tensor(positions, device=device)
        mask = (torch.arange(span, device=device)[None, :] <= positions_tensor[:, None])[:, None, None, :]
        self.cache.begin(None if row_slots is None else torch.tensor(row_slots, device=device),
                         torch.tensor(columns, device=device)[:, None], span)
        tokens_tensor = torch.tensor(tokens, device=device)
        if self.step is not None:
            return self.step(tokens_tensor, positions_tensor, self.cache, mask, logit_rows=logit_rows)
        logits = self.model(tokens_tensor[:, None], positions=positions_tensor[:, None], attention_mask=mask,
                            cache=self.cache, last_only=True)[:, -1]
        return logits if logit_rows is None else logits[logit_rows]

    def _score_prompts(self, rows: list[tuple[_Sequence, int]], logits: torch.Tensor) -> None:
        """Append to each row's prompt_logprobs its chunk's predictions of the prompt's next tokens: column j of
        a row's (left-padded) logits [width, vocab] at position p predicts prompt token p + 1."""
        width = logits.shape[1]
        for (sequence, count), row_logits in zip(rows, logits, strict=True):
            prompt, start = sequence.request.prompt_ids, sequence.cached
            targets = prompt[start + 1:start + count + 1]  # the last prompt token's logits predict no prompt token
            if targets:
                predicted = row_logits[width - count:width - count + len(targets)].float()
                sequence.prompt_logprobs += token_logprobs(predicted, targets,
                                                           [sequence.request.prompt_logprobs] * len(targets))

    @staticmethod
    def _sampled_logprobs(logits: torch.Tensor, sequences: list[_Sequence],
                          tokens: list[int]) -> list[TokenLogprob | None]:
        """Each sequence's sampled token's log-probability where its request asked (None elsewhere): only those
        rows' logits are normalised."""
        asked = [row for row, (sequence, token) in enumerate(zip(sequences, tokens, strict=True))
                 if sequence.request.logprobs is not None and token != FAILED]
        out: list[TokenLogprob | None] = [None] * len(sequences)
        if asked:
            entries = token_logprobs(logits[asked], [tokens[row] for row in asked],
                                     [sequences[row].request.logprobs for row in asked])
            for row, entry in zip(asked, entries, strict=True):
                out[row] = entry
        return out

    def _decode_step(self) -> None:
        """One batched forward for every decoding slot: its next token, and where it is greedy and its text so far
        suggests what follows (`prompt_lookup_draft`), a draft of several tokens checked at once.

        Without drafts, row r of the forward is slot r (rows 0..highest decoding slot; the slots' caches are read in
        place). With drafts, each sequence takes 1 + len(draft) rows, all in its slot: its fed-back token and its
        draft at the next positions, each seeing its slot's columns up to itself. A drafted sequence keeps the
        longest run of draft tokens that equal its own argmax and the argmax after the run: the text plain
        decoding gives, in fewer forwards. The keys/values of rejected draft tokens lie past the sequence's cached
        length, where nothing reads them."""
        if not self._decoding:
            return
        slots = sorted(self._decoding)
        sequences = [self._decoding[slot] for slot in slots]
        drafts = self._drafts(sequences)
        if not any(drafts):
            rows = slots[-1] + 1
            tokens, positions, columns = [0] * rows, [0] * rows, [self.cache.scratch_column] * rows
            for slot, sequence in zip(slots, sequences, strict=True):
                tokens[slot] = sequence.next_token
                positions[slot] = columns[slot] = sequence.cached
            row_slots = None
        else:
            tokens, positions, row_slots = [], [], []
            for sequence, draft in zip(sequences, drafts, strict=True):
                tokens += [sequence.next_token, *draft]
                positions += range(sequence.cached, sequence.cached + 1 + len(draft))
                row_slots += [sequence.slot] * (1 + len(draft))
            columns = positions
        # Rows not decoding (position 0) see column 0 alone, which holds finite numbers, so their (unused) outputs
        # stay finite and never poison the cache.
        logits = self._step_rows(tokens, positions, columns, row_slots).float()
        self.steps += 1
        if row_slots is None:
            first_rows = slots
        else:
            first_rows = list(itertools.accumulate([1 + len(draft) for draft in drafts[:-1]], initial=0))
        sampled = [row for row, draft in enumerate(drafts) if not draft]
        if sampled:
            rows = [first_rows[row] for row in sampled]
            chosen = [sequences[row] for row in sampled]
            row_logits = logits[rows]
            picks = self.sampler.sample(self._constrained(row_logits, chosen), [slots[row] for row in sampled])
            picks = picks.tolist()
            for sequence, token, logprob in zip(chosen, picks, self._sampled_logprobs(row_logits, chosen, picks),
                                                strict=True):
                self._advance(sequence, [sequence.next_token], [token], [logprob])
        for sequence, draft, first in zip(sequences, drafts, first_rows, strict=True):
            if draft:
                block = logits[first:first + 1 + len(draft)]
                best = greedy_tokens(block).tolist()
                kept = next((i for i, (guess, token) in enumerate(zip(draft, best, strict=False)) if guess != token),
                            len(draft))
                self.drafted_tokens += len(draft)
                self.accepted_tokens += kept
                sequence.draft_limit = kept + 2
                self._advance(sequence, [sequence.next_token, *draft[:kept]], best[:kept + 1], [None] * (kept + 1))

    def _drafts(self, sequences: list[_Sequence]) -> list[list[int]]:
        """Each decoding sequence's guessed continuation ([] for most): only a plain greedy choice (its tokens can
        be checked by argmax) with no grammar and no log-probabilities asked, only while the step's rows stay
        within what a decode step multiplies at about the cost of one row, and never past its max_tokens."""
        drafts: list[list[int]] = [[] for _ in sequences]
        if not self.speculative_tokens:
            return drafts
        rows = len(sequences)
        for index, sequence in enumerate(sequences):
            request = sequence.request
            if (not request.params.plain_greedy or sequence.matcher is not None or request.logprobs is not None
                    or rows >= DECODE_ROWS):
                continue
            room = min(self.speculative_tokens, sequence.draft_limit, DECODE_ROWS - rows,
                       request.params.max_new_tokens - sequence.stop.generated - 1)
            if room > 0:
                drafts[index] = prompt_lookup_draft([*request.prompt_ids, *sequence.fed, sequence.next_token], room)
                rows += len(drafts[index])
        return drafts

    def _advance(self, sequence: _Sequence, fed: list[int], picks: list[int],
                 logprobs: list[TokenLogprob | None]) -> None:
        """The sequence's forward took the tokens `fed` (its next token, then accepted draft tokens) and chose
        `picks` after each: record them in order until one ends the sequence (its slot is then freed)."""
        for token_fed, token, logprob in zip(fed, picks, logprobs, strict=True):
            if token == FAILED:
                self._fail_numerically(sequence)
                return
            sequence.cached += 1
            sequence.fed.append(token_fed)
            if not self._accept(sequence, token, logprob):
                self._finish(sequence)
                return

    def _constrained(self, logits: torch.Tensor, sequences: list[_Sequence]) -> torch.Tensor:
        """The logits [rows, vocab] to sample from: a copy with each grammar's forbidden tokens at -inf in its row,
        or the logits themselves when no row has a grammar."""
        rows = [row for row, sequence in enumerate(sequences) if sequence.matcher is not None]
        if not rows:
            return logits
        allowed = self.grammars.allowed_tokens([sequences[row].matcher for row in rows]).to(logits.device)
        constrained = logits.clone()
        constrained[rows] = logits[rows].masked_fill(~allowed, -math.inf)
        return constrained

    def _accept(self, sequence: _Sequence, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Record a sampled token and queue its text (and log-probabilities, where asked); False when the sequence
        is finished (slot to free): by its stop rule, or by its grammar, which can go no further."""
        delta, reason = sequence.stop.push(token)
        if reason is None and sequence.matcher is not None:
            if not sequence.matcher.consume_token(token):  # the mask allowed it: a grammar engine's bug, not ours
                self._outbox.setdefault(sequence.request, []).append(ChoiceEvent(
                    sequence.index, error=f"the grammar refused a token it allowed: {sequence.matcher.get_error()}",
                    completion_tokens=sequence.stop.generated, code="engine_error"))
                return False
            if sequence.matcher.is_stopped():  # the text is complete: held-back text is final, as at a stop
                delta += sequence.stop.stream.finish()
                reason = sequence.stop.finish_reason = "stop"
        if reason is None:
            sequence.next_token = token
        logprobs = [] if logprob is None else [logprob]
        prompt_logprobs, sequence.prompt_logprobs = sequence.prompt_logprobs, None
        if delta or reason is not None or logprobs or prompt_logprobs is not None:
            self._outbox.setdefault(sequence.request, []).append(
                ChoiceEvent(sequence.index, delta, reason, sequence.stop.generated, logprobs=logprobs,
                            prompt_logprobs=prompt_logprobs,
                            token_ids=None if reason is None else [*sequence.fed, token]))
        return reason is None

    def _fail(self, sequence: _Sequence, message: str, code: str = "engine_error") -> None:
        self._outbox.setdefault(sequence.request, []).append(
            ChoiceEvent(sequence.index, error=message, completion_tokens=sequence.stop.generated, code=code))
        self._release(sequence)

    def _fail_numerically(self, sequence: _Sequence) -> None:
        """This choice's logits were NaN or infinite: it ends alone (the batch's other rows sampled as usual), and
        its slot's keys/values, which may hold NaN too, are zeroed and never reused as a prompt prefix."""
        self.cache.clear(sequence.slot)
        self._fail(sequence, "the model's next-token scores for this request became NaN or infinite under its "
                             "sampling parameters, so no token could be sampled; generation stopped",
                   code="numerical_error")

    def _fail_all(self, message: str) -> None:
        for sequence in [*self._prefilling, *self._decoding.values()]:
            self._fail(sequence, message)

    def _fail_waiting(self, message: str, code: str) -> None:
        """Every choice not yet started gets an error event; the waiting requests are dropped."""
        for request in self._waiting:
            for index in request.choices_to_start:
                self._outbox.setdefault(request, []).append(ChoiceEvent(index, error=message, code=code))
            with self._lock:
                self._queued_sequences -= len(request.choices_to_start)
                self._queued_tokens -= len(request.choices_to_start) * request.params.max_new_tokens
                self._unstarted -= not request.started
            request.started = True
            request.choices_to_start.clear()
        self._waiting.clear()

    def _end_all(self, message: str, code: str) -> None:
        for sequence in [*self._prefilling, *self._decoding.values()]:
            self._fail(sequence, message, code=code)
        self._fail_waiting(message, code)

    def _deliver(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for request, events in outbox.items():
            if not request.aborted:
                # A sink whose reader is gone (its event loop closed) must not take the engine down with it.
                with contextlib.suppress(Exception):
                    request.sink(events)
