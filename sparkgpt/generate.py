"""Generation: one sampler, one stop rule and one KV-cached decode loop, for decoder-only and encoder–decoder models.

- `Sampler`: the next token of every row of a batch, each row under its own parameters and its own random stream
  (the serving engine samples through it too, so a seed gives the same text from `LM.generate` and the server);
- `StopRule`: when a sequence ends (a stop token, a stop string, max_new_tokens) and what text each token releases;
- `token_steps`: the decode loop, over a small adapter per model kind (`first()`, then `next(tokens)`);
- `beam_search`: the deterministic alternative, over the same adapters;
- `whisper_decode`: Whisper's windows of log-mel features to text tokens, greedy or beam search, over an adapter
  that adds Whisper's prompt and token rules.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from sparkgpt import hardware
from sparkgpt.data.batch import pad_rows
from sparkgpt.errors import SparkGPTError
from sparkgpt.model import GPT, EncoderDecoder, KVCache
from sparkgpt.model.decode import decode_step
from sparkgpt.model.vision import ImageText
from sparkgpt.model.whisper import Whisper
from sparkgpt.tokenizer import Tokenizer


class SamplingParamError(SparkGPTError):
    """A sampling value of the wrong type or out of range; `field` names it (the HTTP API reports it as `param`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop. temperature 0 (or below SAMPLING_EPS, 1e-5) is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    # OpenAI's penalties over the generated tokens: logits[j] -= count[j] * frequency + (count[j] > 0) * presence.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None  # token id -> a number added to its logit, in [-100, 100]
    min_p: float = 0.0                             # drop tokens less likely than min_p × the likeliest one's
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    seed: int | None = None
    # Beam search (num_beams > 1): the most likely continuation under log p / length^length_penalty, deterministic.
    num_beams: int = 1
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        checks = [
            ("max_new_tokens", is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", is_number(self.temperature) and self.temperature >= 0, "a finite number >= 0"),
            ("top_k", self.top_k is None or (is_int(self.top_k) and self.top_k >= 1), "an integer >= 1"),
            ("top_p", is_number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            # Logits are float32: a penalty that is 0 or inf there (1e-300, 1e300) would make them NaN.
            ("repetition_penalty", is_number(self.repetition_penalty)
             and FLOAT32_TINY <= self.repetition_penalty <= FLOAT32_MAX,
             f"a number from {FLOAT32_TINY:.4g} to {FLOAT32_MAX:.4g} (a normal float32 > 0)"),
            ("presence_penalty", is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "a number from -2 to 2"),
            ("frequency_penalty", is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "a number from -2 to 2"),
            ("logit_bias", self.logit_bias is None or (
                isinstance(self.logit_bias, Mapping)
                and all(is_int(t) and t >= 0 and is_number(b) and -100 <= b <= 100
                        for t, b in self.logit_bias.items())),
             "a mapping of token ids >= 0 to numbers from -100 to 100"),
            ("min_p", is_number(self.min_p) and 0 <= self.min_p <= 1, "a number from 0 to 1"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
            ("stop_token_ids", all(is_int(t) and t >= 0 for t in self.stop_token_ids), "token ids >= 0"),
            ("seed", self.seed is None or is_int(self.seed), "an integer"),
            ("num_beams", is_int(self.num_beams) and self.num_beams >= 1, "an integer >= 1"),
            ("length_penalty", is_number(self.length_penalty), "a finite number"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise SamplingParamError(name, f"sampling parameter {name!r} is {getattr(self, name)!r}; "
                                               f"expected {expected}")

    @property
    def plain_greedy(self) -> bool:
        """Each next token is the argmax of the raw logits (no penalty or bias changes them): what a guessed token
        can be checked against, several at once, by speculative decoding."""
        return ((self.temperature < SAMPLING_EPS or self.top_k == 1) and self.repetition_penalty == 1
                and not self.presence_penalty and not self.frequency_penalty and not self.logit_bias
                and self.num_beams == 1)


FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # the smallest normal float32
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# Below this temperature a row is decoded greedily, as vLLM does (its _SAMPLING_EPS): dividing logits by 1e-40
# would make them inf, and NaN probabilities.
SAMPLING_EPS = 1e-5


def prompt_lookup_draft(tokens: Sequence[int], count: int, max_ngram: int = 3) -> list[int]:
    """Up to `count` tokens guessed to come next by prompt lookup: those that followed the latest earlier
    occurrence of the text's last n tokens (n = max_ngram, then shorter; [] where none recurs). A summary, a
    correction or an edit repeats its input, so a verifier accepts many of these guesses in one forward. A single
    token is taken as the anchor only where it occurred once before: one that recurs ("the", a comma) says little
    of what follows it, and a guess checked and refused costs a row of the step (benchmarks/RESULTS.md)."""
    tokens = tokens if isinstance(tokens, list) else list(tokens)
    length = len(tokens)
    if count < 1 or max_ngram < 1:
        return []
    for n in range(min(max_ngram, length - 1), 1, -1):
        tail = tokens[length - n:]
        last = tail[-1]
        for end in range(length - 2, n - 2, -1):  # `end`: where an earlier occurrence's last token is
            if tokens[end] == last and tokens[end - n + 1:end + 1] == tail:
                return tokens[end + 1:end + 1 + count]
    if length > 1 and tokens.count(tokens[-1]) == 2:  # the last token, and once before it
        end = tokens.index(tokens[-1])
        return tokens[end + 1:end + 1 + count]
    return []


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Completion:
    """One finished sequence: its text, its new token ids, and why it ended ("stop" or "length")."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str = "length"


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor) -> torch.Tensor:
    """CTRL's penalty as transformers applies it: every token already in the text (`seen`, [B, vocab]) made less
    likely. `penalty` is one number, or one per row ([B, 1]; 1 leaves a row as it is, exactly)."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def openai_penalties(logits: torch.Tensor, counts: torch.Tensor, frequency: float | torch.Tensor,
                     presence: float | torch.Tensor) -> torch.Tensor:
    """OpenAI's frequency and presence penalties: logits[j] -= counts[j] * frequency + (counts[j] > 0) * presence,
    `counts` [B, vocab] holding how often each token was generated (the prompt does not count). The penalties are
    numbers or one per row ([B, 1]; 0 and 0 leave a row as it is, exactly)."""
    return logits - counts * frequency - (counts > 0) * presence


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
                   counts: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, vocab] reshaped for sampling under one SamplingParams: the repetition penalty (over `seen`), the
    frequency and presence penalties (over `counts`), the logit bias, then `filter_logits`."""
    if seen is not None:
        logits = repetition_penalty(logits, seen, params.repetition_penalty)
    if counts is not None and (params.frequency_penalty or params.presence_penalty):
        logits = openai_penalties(logits, counts, params.frequency_penalty, params.presence_penalty)
    if params.logit_bias:
        bias = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        bias[torch.tensor(list(params.logit_bias), device=logits.device)] = torch.tensor(
            [float(b) for b in params.logit_bias.values()], dtype=logits.dtype, device=logits.device)
        logits = logits + bias
    return filter_logits(logits, params)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then the top-k, top-p and min-p filters (-inf for every token dropped). Below SAMPLING_EPS the
    temperature means greedy decoding: the logits are left as they are, for an argmax."""
    if params.temperature < SAMPLING_EPS:
        return logits
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth_best = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if params.top_p < 1.0:
        logits = nucleus(logits, params.top_p)
    if params.min_p > 0:
        logits = min_p_filter(logits, params.min_p)
    return logits


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop the tokens whose probability is below min_p × the likeliest token's (transformers' MinPLogitsWarper,
    vLLM's min_p); the likeliest is always kept."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probability reaches top_p (always at least one); -inf the rest.

    The nucleus is usually a few dozen tokens, so it is looked for among the best 256 first (a partial sort, much
    cheaper than sorting a 50k vocabulary per row per step); only when some row's best 256 hold no more than top_p
    of its mass is the whole vocabulary sorted. Either way the kept set is the same."""
    candidates = min(256, logits.shape[-1])
    top_logits, order = logits.topk(candidates, dim=-1)
    probs = (top_logits - logits.logsumexp(dim=-1, keepdim=True)).exp()
    mass_before = probs.cumsum(dim=-1) - probs
    if candidates < logits.shape[-1] and not bool((mass_before[:, -1] > top_p).all()):
        top_logits, order = logits.sort(dim=-1, descending=True)
        probs = top_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
    kept = top_logits.masked_fill(mass_before > top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, kept)


FAILED = -1  # the token `Sampler.sample` gives a row whose logits are not finite numbers


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Each row's most likely token [n] from logits [n, vocab] (the first of equals, as argmax), or FAILED where
    the row has no finite maximum (NaN, +inf, or every token -inf). One `max` gives the value and its index
    together: on a CPU a third of argmax's time, which alone scans no faster (benchmarks/RESULTS.md)."""
    best, tokens = logits.max(dim=-1)
    return tokens.masked_fill(~torch.isfinite(best), FAILED)


class NonFiniteLogits(SparkGPTError):
    """Some rows' logits were NaN or infinite after processing: no token can be drawn for them. `rows` names them
    (the other rows of the batch sampled as usual)."""

    def __init__(self, rows: Sequence[int]) -> None:
        super().__init__(f"the logits of row(s) {list(rows)} are not finite numbers (NaN or infinite) after the "
                         "sampling parameters were applied; no token can be sampled")
        self.rows = list(rows)


class Sampler:
    """The next token of every row of a batch, each row under its own SamplingParams, seed and seen tokens.

    Every decode loop samples through one: `token_steps` (a row per prompt) and the serving engine (a row per
    slot). `start` readies a row; `sample(logits, rows)` picks one token for each given row:

    1. the repetition penalty, the frequency and presence penalties and the logit bias, over the whole batch at
       once, each row with its own values, its own seen tokens (its prompt, then every token it sampled) and its own
       counts of generated tokens;
    2. rows that share temperature, top-k, top-p and min-p filtered together by `filter_logits`; at temperature 0
       (or below SAMPLING_EPS) a row takes its most likely token;
    3. every other row draws by inverse CDF: one float64 uniform from its own generator, located in its cumulative
       probabilities. That is exact in distribution and costs a cumulative sum, where torch.multinomial draws one
       exponential per vocabulary entry (milliseconds per row per step on a CPU). A seeded row's generator is a CPU
       generator of its own, so its text depends on its seed and its logits only: not on its batch neighbours,
       nor on the device. Unseeded rows draw from torch's global generator.

    A row whose logits are not finite after step 1 or 2 (NaN, +inf, or every token -inf) gets the token FAILED
    (-1) and nothing else changes for it; the other rows sample exactly as they would alone. The caller ends such
    a row (the engine fails that request alone; `token_steps` raises NonFiniteLogits).
    """

    def __init__(self, rows: int, vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.vocab_size, self.device = vocab_size, torch.device(device)
        self.params: list[SamplingParams | None] = [None] * rows
        self.filters: list[tuple] = [()] * rows  # (temperature, top_k, top_p, min_p): equal ones go together
        self.generators: list[torch.Generator | None] = [None] * rows
        # Once some row has a repetition penalty: each row's penalty [rows, 1] and tokens in its text [rows, vocab].
        self.penalties: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        # Once some row has a frequency or presence penalty: both per row [rows, 1], and each row's counts of the
        # tokens it generated [rows, vocab].
        self.frequency: torch.Tensor | None = None
        self.presence: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        # Once some row has a logit bias: each row's bias [rows, vocab] (zeros for a row without one).
        self.bias: torch.Tensor | None = None

    def start(self, row: int, params: SamplingParams, seed: int | None = None, context: Sequence[int] = ()) -> None:
        """Row `row` samples under `params` from now on, its draws seeded with `seed` (None: torch's global
        generator); `context` holds the tokens already in its text, for the repetition penalty."""
        bias = dict(params.logit_bias or {})
        outside = next((t for t in bias if t >= self.vocab_size), None)
        if outside is not None:
            raise SamplingParamError("logit_bias", f"logit_bias names the token id {outside}, outside the "
                                                   f"vocabulary [0, {self.vocab_size})")
        self.params[row] = params
        greedy = params.temperature < SAMPLING_EPS or params.top_k == 1  # the first of equal maxima, as argmax
        self.filters[row] = (0.0 if greedy else params.temperature, params.top_k, params.top_p, params.min_p)
        self.generators[row] = None if seed is None else torch.Generator().manual_seed(seed)
        rows, device = len(self.params), self.device
        penalty = params.repetition_penalty
        if penalty != 1.0 and self.seen is None:
            self.seen = torch.zeros(rows, self.vocab_size, dtype=torch.bool, device=device)
            self.penalties = torch.ones(rows, 1, device=device)
        if self.seen is not None:  # (a penalty of 1 is the identity: such a row may ride along a penalised batch)
            self.penalties[row] = penalty
            self.seen[row] = False
            if penalty != 1.0 and len(context):
                self.seen[row, torch.as_tensor(list(context), device=device)] = True
        if (params.frequency_penalty or params.presence_penalty) and self.counts is None:
            self.counts = torch.zeros(rows, self.vocab_size, device=device)
            self.frequency, self.presence = torch.zeros(rows, 1, device=device), torch.zeros(rows, 1, device=device)
        if self.counts is not None:  # (penalties of 0 are the identity, exactly)
            self.frequency[row], self.presence[row] = params.frequency_penalty, params.presence_penalty
            self.counts[row] = 0
        if bias and self.bias is None:
            self.bias = torch.zeros(rows, self.vocab_size, device=device)
        if self.bias is not None:
            self.bias[row] = 0
            if bias:
                self.bias[row, torch.tensor(list(bias), device=device)] = torch.tensor(
                    [float(b) for b in bias.values()], device=device)

    def sample(self, logits: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
        """The next token [n] of each row from its logits [n, vocab]; `rows` names each logits row's sampler row
        (None: rows 0..n-1). A row whose logits are not finite gets FAILED."""
        n = logits.shape[0]
        if n == 0:
            return torch.empty(0, dtype=torch.long, device=logits.device)
        rows = range(n) if rows is None else rows
        groups: dict[tuple, list[int]] = {}
        penalised = counted = biased = False
        for i, row in enumerate(rows):
            groups.setdefault(self.filters[row], []).append(i)
            params = self.params[row]
            penalised = penalised or params.repetition_penalty != 1.0
            counted = counted or bool(params.frequency_penalty or params.presence_penalty)
            biased = biased or bool(params.logit_bias)
        index = None  # the rows' sampler rows as an index, where they have per-row state to read or keep up
        whole = n == len(self.params) and rows == range(n)
        if self.seen is not None or self.counts is not None or self.bias is not None:
            index = torch.arange(n, device=self.device) if whole else torch.as_tensor(list(rows), device=self.device)

        def of_rows(state: torch.Tensor) -> torch.Tensor:
            return state if whole else state[index]

        if penalised:
            logits = repetition_penalty(logits, of_rows(self.seen), of_rows(self.penalties))
        if counted:
            logits = openai_penalties(logits, of_rows(self.counts), of_rows(self.frequency), of_rows(self.presence))
        if biased:
            logits = logits + of_rows(self.bias)
        tokens: torch.Tensor | None = None
        for (temperature, _, _, _), members in groups.items():
            chosen = None if len(members) == n else torch.tensor(members, device=logits.device)
            block = logits if chosen is None else logits[chosen]
            if temperature == 0:
                picks = greedy_tokens(block)
            else:
                bad = ~torch.isfinite(block.amax(dim=-1))  # NaN, +inf, or nothing left (every token -inf)
                filtered = filter_logits(block, self.params[rows[members[0]]])
                bad |= ~torch.isfinite(filtered.amax(dim=-1))
                if bool(bad.any()):  # a failed row draws from zeros, harmlessly; its pick is replaced below
                    filtered = filtered.masked_fill(bad[:, None], 0.0)
                picks = self._draw(filtered, [rows[i] for i in members]).masked_fill(bad, FAILED)
            if chosen is None:
                tokens = picks
            else:
                if tokens is None:
                    tokens = torch.empty(n, dtype=torch.long, device=logits.device)
                tokens[chosen] = picks
        if index is not None:
            kept, picked = index, tokens
            ok = tokens != FAILED
            if not bool(ok.all()):
                kept, picked = index[ok], tokens[ok]
            if self.seen is not None:
                self.seen[kept, picked] = True
            if self.counts is not None:
                self.counts[kept, picked] += 1
        return tokens

    def _draw(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """One token per row of filtered logits [m, vocab]: the first whose cumulative probability exceeds the
        row's uniform draw (right=True: never a token of probability zero)."""
        cumulative = logits.softmax(dim=-1).double().cumsum(dim=-1)
        uniforms = torch.cat([torch.rand(1, dtype=torch.float64, generator=self.generators[row]) for row in rows])
        targets = uniforms.to(cumulative.device)[:, None] * cumulative[:, -1:]
        return torch.searchsorted(cumulative, targets, right=True)[:, 0].clamp(max=logits.shape[-1] - 1)


# ---- text and stop rules -------------------------------------------------------------------------------------

def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text up to the earliest stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class StopMatcher:
    """Knuth–Morris–Pratt over a growing text for one stop string: `feed` reads the text's new characters once
    each, and `held` is the longest end of the text read so far that begins the stop string (what must be held
    back). The failure table is built only as far as a match has got (never past the text's length), so a
    100,000-character stop string costs no more than a short one while the text does not spell it out."""

    def __init__(self, stop: str) -> None:
        self.stop = stop
        self.border = [0]   # border[i]: the longest proper prefix of stop[:i + 1] that also ends it
        self.held = 0       # characters of the stop string matched at the end of the text read so far

    def _border(self, i: int) -> int:
        stop, border = self.stop, self.border
        while len(border) <= i:
            j, k = len(border), border[-1]
            while k and stop[j] != stop[k]:
                k = border[k - 1]
            border.append(k + 1 if stop[j] == stop[k] else k)
        return border[i]

    def feed(self, chunk: str, offset: int) -> int:
        """Read the text's next characters, `chunk`, which begin at index `offset` of the text; the index in the
        text where the stop string first appears, or -1."""
        stop, k, size = self.stop, self.held, len(self.stop)
        first = stop[0]
        position = 0
        while position < len(chunk):
            if k == 0:  # skip to the next character that could begin the stop string, at C speed
                position = chunk.find(first, position)
                if position < 0:
                    break
            char = chunk[position]
            while k and stop[k] != char:
                k = self._border(k - 1)
            if stop[k] == char:
                k += 1
                if k == size:
                    self.held = k
                    return offset + position + 1 - size
            position += 1
        self.held = k
        return -1


class StreamText:
    """One sequence's text as its tokens arrive, released only once no stop string can still begin in it.

    Each stop string has a `StopMatcher` that reads each new character once, and only the text not yet released
    is kept, so the work per token is the new text's length (amortised), whatever the stop strings' lengths or the
    text's."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self.decoder = tokenizer.incremental_decoder()
        self.stop = stop
        self.matchers = [StopMatcher(s) for s in stop]
        self.length = 0                 # characters of text so far
        self.released = 0               # characters of it released
        self.pending: deque[str] = deque()  # text[released:length], held back, as the chunks that brought it
        self.cut: int | None = None     # where the earliest stop string begins, once one has appeared

    def push(self, token_id: int) -> tuple[str, bool]:
        """The text this token lets us release, and whether a stop string has now appeared."""
        return self._release(self.decoder.push(token_id), final=False)

    def finish(self) -> str:
        return self._release(self.decoder.flush(), final=True)[0]

    def _release(self, chunk: str, final: bool) -> tuple[str, bool]:
        if chunk and self.cut is None:
            found = [i for i in (matcher.feed(chunk, self.length) for matcher in self.matchers) if i >= 0]
            if found:
                self.cut = min(found)
            self.pending.append(chunk)
        self.length += len(chunk)
        stopped = self.cut is not None
        end = self.cut if stopped else self.length
        if not stopped and not final:
            end -= max((matcher.held for matcher in self.matchers), default=0)
        if end <= self.released:
            return "", stopped
        out, count = [], end - self.released
        while count:  # whole chunks off the front, then part of one: each character is moved once
            piece = self.pending[0]
            if len(piece) <= count:
                out.append(self.pending.popleft())
                count -= len(piece)
            else:
                out.append(piece[:count])
                self.pending[0] = piece[count:]
                count = 0
        self.released = end
        return "".join(out), stopped


class StopRule:
    """When one sequence ends, and the text each of its tokens releases: a stop token (left out of the text) or a
    stop string (the text ends before it; `StreamText` holds back what could still begin one) ends it with "stop",
    its max_new_tokens-th token with "length"."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, stop_token_ids: Collection[int] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, params.stop
        self.stream = StreamText(tokenizer, params.stop)
        self.stop_ids = frozenset(stop_token_ids).union(params.stop_token_ids)
        self.max_new_tokens = params.max_new_tokens
        self.token_ids: list[int] = []    # the text's tokens (a stop token is not one)
        self.generated = 0                # tokens sampled, a stop token included
        self.finish_reason: str | None = None

    def push(self, token: int) -> tuple[str, str | None]:
        """The text this token releases, and why the sequence is now done ("stop", "length") or None."""
        self.generated += 1
        reason, delta = None, ""
        if token in self.stop_ids:
            reason = "stop"
        else:
            self.token_ids.append(token)
            delta, stopped = self.stream.push(token)
            if stopped:
                reason = "stop"
            elif self.generated >= self.max_new_tokens:
                reason = "length"
        if reason is not None:
            delta += self.stream.finish()  # held-back text is final now (empty past a stop string)
            self.finish_reason = reason
        return delta, reason

    def completion(self, prompt_tokens: int) -> Completion:
        """The finished sequence (its text decoded whole, cut at the first stop string)."""
        text, _ = cut_at_stop(self.tokenizer.decode(self.token_ids), self.stop)
        return Completion(text, self.token_ids, prompt_tokens, self.finish_reason or "length")


def stream_completions(
    model: GPT | EncoderDecoder, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], params: SamplingParams,
    stop_token_ids: Sequence[int] = (), images: torch.Tensor | None = None,
) -> Iterator[tuple[int, str, Completion | None]]:
    """Yield (row, text delta, Completion once that row is done) as generation proceeds over a batch. Every row
    with a seed draws from a generator of its own seeded with it: a prompt's text is the same alone or batched.
    `images` (pixel values, one per prompt) are what an image-to-text model's prompts ask about."""
    if params.num_beams > 1:
        stop_ids = set(params.stop_token_ids) | set(stop_token_ids)
        yield from beam_completions(model, tokenizer, prompts, params, stop_ids, images)
        return
    rules = [StopRule(tokenizer, params, stop_token_ids) for _ in prompts]
    steps = token_steps(model, prompts, params, images)
    for tokens in steps:
        for row, token in enumerate(tokens.tolist()):
            rule = rules[row]
            if rule.finish_reason is not None:
                continue
            delta, reason = rule.push(token)
            if delta or reason is not None:
                yield row, delta, None if reason is None else rule.completion(len(prompts[row]))
        if all(rule.finish_reason is not None for rule in rules):
            steps.close()
            return


# ---- the decode loop -----------------------------------------------------------------------------------------

class _DecoderOnly:
    """A decoder-only model as the decode loops drive it: `first()` runs the prompts and gives each row's
    next-token logits [B, vocab]; `next(tokens)` feeds one token [B] per row and gives the logits after it.

    Prompts of different lengths are left-padded into one batch: padding is masked out of attention and each row's
    positions count from its own first token, so every row computes what it would alone. The prompt goes through
    the model's forward; each new token through its lean decode step (`sparkgpt.model.decode`) when it has one.
    Beam search passes `parents` to `next`: the rows that go on (in order, repeats allowed)."""

    def __init__(self, model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        config = model.config
        weight = model.token_embedding.weight
        batch, longest = len(prompts), max(len(p) for p in prompts)
        capacity = longest + max_new_tokens
        if capacity > config.max_seq_len:
            raise SparkGPTError(
                f"prompt of {longest} tokens plus max_new_tokens {max_new_tokens} exceeds the model's "
                f"context of {config.max_seq_len} tokens"
            )
        input_ids, prompt_mask = pad_rows(prompts, left=True)
        # The new tokens' columns are all real: the mask over the whole cache is the prompts' mask, then ones.
        padding_mask = torch.cat([prompt_mask, torch.ones(batch, max_new_tokens, dtype=torch.long)], dim=1)
        self.model, self.device = model, weight.device
        self.input_ids, self.padding_mask = input_ids.to(self.device), padding_mask.to(self.device)
        self.ragged = any(len(p) != longest for p in prompts)
        self.positions = (self.padding_mask[:, :longest].cumsum(dim=1) - 1).clamp(min=0)
        self.visible = self.padding_mask.bool()[:, None, None, :]  # [B, 1, 1, capacity]: the steps' masks' prefixes
        self.cache = KVCache(config, batch, capacity, weight.dtype, weight.device)
        self.step = decode_step(model)

    def first(self) -> torch.Tensor:
        longest = self.input_ids.shape[1]
        logits = self.model(self.input_ids, positions=self.positions, cache=self.cache, last_only=True,
                            attention_mask=self.padding_mask[:, :longest] if self.ragged else None)[:, -1]
        self.next_positions = self.positions[:, -1] + 1
        return logits.float()

    def next(self, tokens: torch.Tensor, parents: torch.Tensor | None = None) -> torch.Tensor:
        if parents is not None:
            self.cache.reorder(parents)
            self.next_positions = self.next_positions[parents]
            if self.ragged:
                self.padding_mask, self.visible = self.padding_mask[parents], self.visible[parents]
        end = self.cache.length + 1
        if self.step is not None:
            mask = self.visible[..., :end] if self.ragged else None
            logits = self.step(tokens, self.next_positions, self.cache, mask)
        else:
            logits = self.model(tokens[:, None], positions=self.next_positions[:, None], cache=self.cache,
                                attention_mask=self.padding_mask[:, :end] if self.ragged else None,
                                last_only=True)[:, -1]
        self.next_positions = self.next_positions + 1
        return logits.float()


def _start_token(model: EncoderDecoder) -> int:
    config = model.config
    start = next((token for token in (config.decoder_start_token_id, config.bos_token_id, config.pad_token_id)
                  if token is not None), None)
    if start is None:
        raise SparkGPTError("this encoder–decoder model has no decoder_start_token_id, bos_token_id or pad_token_id "
                            "to start decoding from")
    return start


def _encode_sources(model: EncoderDecoder, sources: Sequence[Sequence[int]]):
    """Right-padded source ids, their padding mask and the memory's keys/values of every decoder layer."""
    weight = model.embeddings.token_embedding.weight
    source_ids, source_mask = pad_rows(sources, model.config.pad_token_id or 0)
    source_ids, source_mask = source_ids.to(weight.device), source_mask.to(weight.device)
    return source_mask, model.memory_kv(model.encode(source_ids, source_mask))


class _EncoderDecoder:
    """An encoder–decoder as the decode loops drive it (`first`, `next`, as `_DecoderOnly`): the sources are
    encoded once, then the target is decoded from the start token with the KV cache (cross-attention keys/values
    computed once per layer). Beam search (`parents`) runs over one source: its memory, of batch 1, serves every
    beam as it is (CrossAttention reads it once for all of them)."""

    def __init__(self, model: EncoderDecoder, sources: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        config, weight = model.config, model.embeddings.token_embedding.weight
        if max_new_tokens + 1 > config.max_seq_len:
            raise SparkGPTError(f"max_new_tokens {max_new_tokens} exceeds the model's context of "
                                f"{config.max_seq_len} tokens")
        self.model, self.sources, self.device = model, sources, weight.device
        self.cache = KVCache(config, len(sources), max_new_tokens + 1, weight.dtype, weight.device)

    def first(self) -> torch.Tensor:
        self.source_mask, self.memory_kv = _encode_sources(self.model, self.sources)
        start = torch.full((len(self.sources),), _start_token(self.model), dtype=torch.long, device=self.device)
        return self._decode(start)

    def next(self, tokens: torch.Tensor, parents: torch.Tensor | None = None) -> torch.Tensor:
        if parents is not None:
            if len(self.sources) != 1:
                raise SparkGPTError("beam search decodes one source at a time")
            self.cache.reorder(parents)
        return self._decode(tokens)

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.decode(tokens[:, None], self.memory_kv, self.source_mask, self.cache)[:, -1].float()


class _Prompted(_EncoderDecoder):
    """An encoder–decoder whose source is not tokens (Whisper's log-mel windows, an image-to-text model's pixels)
    as the decode loops drive it: the inputs [B, ...] encoded once, then each row's decoder prompt (its start token
    first; every row's of one length) run through the cache."""

    def __init__(self, model: EncoderDecoder, inputs: torch.Tensor, prompts: Sequence[Sequence[int]],
                 max_new_tokens: int) -> None:
        config, weight = model.config, model.lm_head.weight
        lengths = {len(prompt) for prompt in prompts}
        if len(lengths) != 1 or len(prompts) != len(inputs):
            raise SparkGPTError(f"{len(prompts)} decoder prompts of lengths {sorted(lengths)} for {len(inputs)} "
                                "inputs: expected one prompt per input, all of one length")
        length = lengths.pop()
        if not length or max_new_tokens < 1 or length + max_new_tokens > config.max_seq_len:
            raise SparkGPTError(f"a prompt of {length} tokens and max_new_tokens {max_new_tokens}: expected "
                                f"at least one of each, within the decoder's {config.max_seq_len} positions")
        self.model, self.sources, self.device = model, inputs, weight.device
        self.prompts = [list(prompt) for prompt in prompts]
        self.cache = KVCache(config, len(inputs), length + max_new_tokens, weight.dtype, weight.device)

    def first(self) -> torch.Tensor:
        model = self.model
        self.source_mask, self.memory_kv = None, model.memory_kv(model.encode(self.sources.to(self.device)))
        prompt = torch.tensor(self.prompts, dtype=torch.long, device=self.device)
        return model.decode(prompt, self.memory_kv, cache=self.cache, last_only=True)[:, -1].float()


class _Whisper(_Prompted):
    """Whisper as the decode loops drive it: log-mel windows [B, n_mels, frames], the special-token `prompt` (the
    same for every row), and Whisper's token rules on every step's logits (`suppress_tokens` never,
    `begin_suppress_tokens` not first): -inf before the log-softmax, as CTranslate2 and OpenAI's decoder apply
    them, so beam scores are over the tokens allowed."""

    def __init__(self, model: Whisper, features: torch.Tensor, prompt: Sequence[int], max_new_tokens: int) -> None:
        super().__init__(model, features, [prompt] * len(features), max_new_tokens)
        self.suppress = torch.tensor(model.config.suppress_tokens, dtype=torch.long, device=self.device)

    def first(self) -> torch.Tensor:
        logits = super().first()
        logits[:, self.model.config.begin_suppress_tokens] = float("-inf")
        return self._allowed(logits)

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._allowed(super()._decode(tokens))

    def _allowed(self, logits: torch.Tensor) -> torch.Tensor:
        logits[:, self.suppress] = float("-inf")
        return logits


def _decode_model(model: GPT | EncoderDecoder, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  images: torch.Tensor | None = None):
    """The model as the decode loops drive it, whatever its kind. With `images` (pixel values [B, C, H, W], one per
    prompt) the model is an image-to-text one and each prompt follows the start token in its decoder."""
    if images is not None:
        if not isinstance(model, ImageText):
            raise SparkGPTError(f"this model does not read images: it is {type(model).__name__}, not an "
                                "image-to-text model")
        start = _start_token(model)
        return _Prompted(model, images, [[start, *prompt] for prompt in prompts], max_new_tokens)
    kind = _EncoderDecoder if isinstance(model, EncoderDecoder) else _DecoderOnly
    return kind(model, prompts, max_new_tokens)


@torch.inference_mode()
def token_steps(
    model: GPT | EncoderDecoder, prompts: Sequence[Sequence[int]], params: SamplingParams,
    images: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token [B] of every prompt (a decoder-only model's, or an image-to-text model's about each of
    `images`) or source (an encoder–decoder's), step by step, up to max_new_tokens; stop iterating to stop. Every
    row's draws are seeded with params.seed from a generator of its own, so a row's tokens do not depend on the
    rest of the batch."""
    try:
        runner = _decode_model(model, prompts, params.max_new_tokens, images)
        # The repetition penalty counts a prompt's tokens, not a source's.
        contexts = prompts if isinstance(runner, (_DecoderOnly, _Prompted)) else [()] * len(prompts)
        yield from _steps(runner, contexts, params, model.config.vocab_size)
    finally:  # so that the next thread to generate is the only one holding OpenMP workers
        hardware.release_idle_threads()


def _steps(runner, contexts: Sequence[Sequence[int]], params: SamplingParams, vocab_size: int
           ) -> Iterator[torch.Tensor]:
    """`token_steps` over a model adapter: every row sampled by one Sampler, `contexts` its seen tokens."""
    sampler = Sampler(len(contexts), vocab_size, runner.device)
    for row, context in enumerate(contexts):
        sampler.start(row, params, params.seed, context)
    logits = runner.first()
    for step in range(params.max_new_tokens):
        tokens = sampler.sample(logits)
        failed = tokens == FAILED
        if bool(failed.any()):
            raise NonFiniteLogits(failed.nonzero().flatten().tolist())
        yield tokens
        if step + 1 == params.max_new_tokens:
            return
        logits = runner.next(tokens)


# ---- beam search ---------------------------------------------------------------------------------------------

@torch.inference_mode()
def beam_search(
    model: GPT | EncoderDecoder, prompt: Sequence[int], params: SamplingParams, stop_ids: set[int],
    image: torch.Tensor | None = None,
) -> tuple[list[int], bool]:
    """The best continuation of one prompt (decoder-only) or source (encoder–decoder) found with `num_beams`
    beams, and whether it ended with a stop token (left out of the ids). Hypotheses are scored as transformers
    scores them: the stop token counts in the length (`_beam`)."""
    images = None if image is None else image[None]
    return _beam(_decode_model(model, [prompt], params.max_new_tokens, images), params, stop_ids,
                 stop_in_length=True)


def _beam(runner, params: SamplingParams, stop_ids: set[int], stop_in_length: bool) -> tuple[list[int], bool]:
    """Beam search over a model adapter of one row.

    Each step extends every live beam by every token and keeps the 2 · `num_beams` best by summed log-probability.
    Among the first `num_beams` of them, a candidate ending in a stop token is finished, scored
    Σ log p / length^length_penalty; the first `num_beams` candidates that do not end go on. The search ends once
    `num_beams` hypotheses are finished (transformers' early_stopping=True, CTranslate2's patience 1), or at
    max_new_tokens, where the first `num_beams` candidates are all finished. The length counts the new tokens, the
    stop token among them when `stop_in_length` (transformers) or not (OpenAI's Whisper, CTranslate2). With one
    beam this is greedy decoding, token for token."""
    beams = params.num_beams
    logprobs = torch.log_softmax(runner.first(), dim=-1)
    sums = torch.zeros(1, device=logprobs.device)
    alive: list[list[int]] = [[]]
    finished: list[tuple[float, list[int], bool]] = []
    vocab = logprobs.shape[-1]

    def finish(score: float, ids: list[int], stopped: bool) -> None:
        length = max(len(ids) + (stopped and stop_in_length), 1)  # (an empty hypothesis: not scored over zero)
        finished.append((score / length ** params.length_penalty, ids, stopped))

    for step in range(params.max_new_tokens):
        last = step + 1 == params.max_new_tokens
        scores = (sums[:, None] + logprobs).flatten()
        top_scores, top_index = scores.topk(min(2 * beams, scores.numel()))
        parents, tokens, next_sums, next_alive = [], [], [], []
        for rank, (score, index) in enumerate(zip(top_scores.tolist(), top_index.tolist(), strict=True)):
            parent, token = divmod(index, vocab)
            stopped = token in stop_ids
            if rank < beams and (stopped or last):
                finish(score, alive[parent] if stopped else [*alive[parent], token], stopped)
            if stopped or last:
                continue
            parents.append(parent)
            tokens.append(token)
            next_sums.append(score)
            next_alive.append([*alive[parent], token])
            if len(next_alive) == beams:
                break
        if len(finished) >= beams or last or not next_alive:
            break
        alive, sums = next_alive, torch.tensor(next_sums, device=logprobs.device)
        logprobs = torch.log_softmax(runner.next(torch.tensor(tokens, device=runner.device),
                                                 torch.tensor(parents, device=runner.device)), dim=-1)
    _, ids, stopped = max(finished, key=lambda hypothesis: hypothesis[0])
    return ids, stopped


def beam_completions(
    model: GPT | EncoderDecoder, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], params: SamplingParams,
    stop_ids: set[int], images: torch.Tensor | None = None,
) -> Iterator[tuple[int, str, Completion | None]]:
    """Beam search over each prompt in turn; each yields its whole text at once (beams cannot stream)."""
    for row, prompt in enumerate(prompts):
        ids, stopped = beam_search(model, prompt, params, stop_ids, None if images is None else images[row])
        text, cut = cut_at_stop(tokenizer.decode(ids), params.stop)
        reason = "stop" if stopped or cut else "length"
        yield row, text, Completion(text, ids, len(prompt), reason)


# ---- Whisper -------------------------------------------------------------------------------------------------

@torch.inference_mode()
def whisper_decode(model: Whisper, features: torch.Tensor, prompt: Sequence[int], beam_size: int = 5,
                   length_penalty: float = 1.0, max_new_tokens: int = 224, eot: int | None = None
                   ) -> list[list[int]]:
    """Each window's text tokens after the special-token `prompt`, up to the end of text `eot` (left out; None:
    the config's eos_token_id).

    features: log-mel windows [B, n_mels, frames]. beam_size 1 decodes all windows together, greedily (the Sampler
    at temperature 0); more beams search each window in turn, its hypotheses scored Σ log p / length^length_penalty
    over the text tokens (faster-whisper's defaults: 5 beams, length_penalty 1). At most max_new_tokens (224, half
    the decoder's positions, as CTranslate2 caps them) and never past the decoder's last position."""
    eot = model.config.eos_token_id if eot is None else eot
    if not is_int(eot):
        raise SparkGPTError(f"this Whisper config's eos_token_id is {eot!r}: expected one end-of-text token id")
    if not is_int(beam_size) or beam_size < 1:
        raise SamplingParamError("beam_size", f"beam_size is {beam_size!r}; expected an integer >= 1")
    max_new_tokens = min(max_new_tokens, model.config.max_seq_len - len(prompt))
    params = SamplingParams(max_new_tokens=max(max_new_tokens, 1), temperature=0.0, num_beams=beam_size,
                            length_penalty=length_penalty)
    if beam_size > 1:
        return [_beam(_Whisper(model, window[None], prompt, max_new_tokens), params, {eot}, stop_in_length=False)[0]
                for window in features]
    rows: list[list[int]] = [[] for _ in features]
    done = [False] * len(features)
    steps = _steps(_Whisper(model, features, prompt, max_new_tokens), [()] * len(features), params,
                   model.config.vocab_size)
    for tokens in steps:
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            if token == eot:
                done[row] = True
            else:
                rows[row].append(token)
        if all(done):
            steps.close()
            break
    return rows
