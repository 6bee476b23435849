"""lm-evaluation-harness on sparkgpt's own model and tokenizer (no conversion to transformers).

    python -m sparkgpt.evaluate.lm_eval_adapter --model sparkgpt --model_args ref=smollm2-135m-instruct \\
        --tasks my_local_task --include_path ./tasks

runs lm_eval's own command line with the `sparkgpt` model registered; in Python, importing this module
registers it for `lm_eval.simple_evaluate(model="sparkgpt", model_args="ref=...")`. lm-eval is not a dependency
of sparkgpt: install it (`pip install lm-eval`) to use this.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import lm_eval.models  # noqa: F401 (lm-eval fills its registry with its own models only while it is empty)
from lm_eval.api.model import LM as HarnessLM
from lm_eval.api.registry import register_model

from sparkgpt.evaluate.loglik import encode_pair, prefix_token, score_batch, score_text
from sparkgpt.lm import load


@register_model("sparkgpt")
class SparkGPTHarnessModel(HarnessLM):
    """Answers lm-eval's three request types with sparkgpt's scoring and generation."""

    def __init__(self, ref: str, dtype: str = "float32", device: str = "cpu", batch_size: int | str = 8,
                 **_: Any) -> None:
        super().__init__()
        self.lm = load(ref, dtype=dtype, device=device)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8

    @property
    def max_length(self) -> int:
        return self.lm.config.max_seq_len

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Requests sharing a context (the choices of one question) are scored together on one prefix, and
        `batch_size` such contexts at a time."""
        tokenizer = self.lm.tokenizer
        by_context: dict[tuple[int, ...], list[tuple[int, list[int]]]] = defaultdict(list)
        for index, request in enumerate(requests):
            context, continuation = request.args
            context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
            context_ids = context_ids or [prefix_token(tokenizer)]
            # Keep the most recent tokens when the pair outgrows the model's context, as lm-eval's HFLM does.
            context_ids = context_ids[-(self.max_length - len(continuation_ids)):]
            by_context[tuple(context_ids)].append((index, continuation_ids))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        groups = list(by_context.items())
        for start in range(0, len(groups), self.batch_size):
            chunk = groups[start:start + self.batch_size]
            batch = [(list(context), [ids for _, ids in group]) for context, group in chunk]
            scored = score_batch(self.lm.model, batch)
            for (_, group), scores in zip(chunk, scored, strict=True):
                for (index, _), score in zip(group, scores, strict=True):
                    results[index] = (score.logprob, score.is_greedy)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        tokenizer = self.lm.tokenizer
        return [score_text(self.lm.model, tokenizer.encode(request.args[0], add_special_tokens=False),
                           prefix_token(tokenizer)) for request in requests]

    def generate_until(self, requests) -> list[str]:
        outputs = []
        for request in requests:
            context, settings = request.args
            until = settings.get("until") or []
            sampling = {"max_new_tokens": settings.get("max_gen_toks", 256),
                        "stop": [until] if isinstance(until, str) else list(until)}
            if settings.get("do_sample"):
                sampling["temperature"] = settings.get("temperature", 1.0)
            else:
                sampling["temperature"] = 0
            ids = self.lm.tokenizer.encode(context, add_special_tokens=False) or [prefix_token(self.lm.tokenizer)]
            ids = ids[-(self.max_length - sampling["max_new_tokens"]):]
            outputs.append(self.lm.complete([ids], **sampling)[0].text)
        return outputs


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
