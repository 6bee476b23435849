"""The `sparkgpt` command: a thin skin over the Python API, one function per subcommand.

Every user error surfaces as a SparkGPTError: one line on stderr, exit status 1, no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from sparkgpt.errors import SparkGPTError


def cmd_models(args: argparse.Namespace) -> None:
    """List the named model presets with their shapes and parameter counts."""
    from sparkgpt.checkpoint.families import family_for
    from sparkgpt.config import PRESETS, preset

    print(f"{'preset':<20}{'family':<10}{'layers':>7}{'d_model':>9}{'heads':>7}{'kv':>5}{'context':>9}{'params':>10}")
    for name in PRESETS:
        config = preset(name)
        known = family_for(config)  # the transformers family it saves as, else our own
        family = known.model_type if known else "sparkgpt"
        print(f"{name:<20}{family:<10}{config.n_layers:>7}{config.d_model:>9}{config.n_heads:>7}{config.n_kv_heads:>5}"
              f"{config.max_seq_len:>9}{_human(config.num_parameters()):>10}")


def cmd_info(args: argparse.Namespace) -> None:
    """Show this machine as sparkgpt sees it: the CPU and its instruction sets, GPUs, and the fast paths chosen
    here (native kernels, bf16 attention, quantised kernels, training dtype) with the reason for each."""
    import json

    import torch

    from sparkgpt import __version__, hardware
    from sparkgpt.model import native, quant

    native.note_paths()
    quant.note_kernels()
    here = hardware.cpu()
    hardware.note("threads", f"{here.threads} of {here.cores} cores", "torch's default, one per physical core "
                  "(OMP_NUM_THREADS or --threads where a command has it overrides)")
    cached = hardware.cached_choices()
    report = {
        "sparkgpt": __version__, "torch": torch.__version__, "python": sys.version.split()[0],
        "cpu": {"model": here.model, "architecture": here.architecture, "isa": here.isa,
                "torch_kernels": here.torch_kernels, "cores": here.cores, "threads": here.threads,
                "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA")},
        "gpus": hardware.gpus(),
        "chosen": [{"path": c.decision, "chosen": c.chosen, "why": c.reason} for c in hardware.choices()],
        "measured": {"cache": str(hardware.choices_file()), "entries": cached},
    }
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return
    print(f"sparkgpt {report['sparkgpt']}, torch {report['torch']}, Python {report['python']}")
    print(f"CPU: {here.model} ({here.architecture}), {here.cores} cores; torch's kernels: {here.torch_kernels}")
    print(f"ISA: {here.isa}" + (f"; oneDNN capped at {report['cpu']['onednn_max_cpu_isa']}"
                                if report["cpu"]["onednn_max_cpu_isa"] else ""))
    print("GPU: " + ("; ".join(report["gpus"]) or "none (CUDA not available)"))
    print("fast paths:")
    for choice in hardware.choices():
        print(f"  {choice.decision}: {choice.chosen}\n      why: {choice.reason}")
    print(f"measured on this CPU (cache {report['measured']['cache']}):")
    for key, entry in cached.items():
        print(f"  {entry.get('decision', key)}: {entry.get('chosen')} ({entry.get('times', '')})")
    if not cached:
        print("  nothing yet (a training run with dtype auto times bf16 against float32 once)")


def cmd_generate(args: argparse.Namespace) -> None:
    """Continue a prompt with a model and print the completion."""

    lm = _load(args)
    sampling = _sampling(args)
    if args.stream:
        for delta in lm.stream(args.prompt, **sampling):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(lm.generate(args.prompt, **sampling))


def cmd_embed(args: argparse.Namespace) -> None:
    """Print normalised sentence embeddings of texts with an encoder model (one JSON list per text)."""
    import json


    lm = _load(args)
    for vector in lm.embed(args.text):
        print(json.dumps([round(x, 6) for x in vector.tolist()]))


def cmd_chat(args: argparse.Namespace) -> None:
    """Chat with a model in the terminal (streaming replies), or send one --message and print the reply."""
    from sparkgpt.chat import chat_session, stream_reply, user_turn
    from sparkgpt.data.images import image_data_url

    image_url = image_data_url(args.image) if args.image else None  # a bad file fails before the model loads
    lm = _load(args)
    sampling = _sampling(args)
    if args.message is not None:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        if stream_reply(lm, [*messages, user_turn(args.message, image_url)], sys.stdout, **sampling) is None:
            sys.exit(1)
    else:
        chat_session(lm, system=args.system, image_url=image_url, **sampling)


def cmd_convert(args: argparse.Namespace) -> None:
    """Write any loadable model reference (directory, .gguf, alias, hub id) as an HF-compatible directory, or as
    a GGUF file for llama.cpp, Ollama and LM Studio when DST ends in .gguf."""
    import sparkgpt
    from sparkgpt.checkpoint import gguf_export

    if Path(args.dst).suffix.lower() == ".gguf":
        dtype = args.dtype or "f16"
        print(f"wrote {gguf_export.export_gguf(args.src, args.dst, dtype=dtype)} ({dtype})")
        return
    dtype = args.dtype or "float32"
    if dtype in gguf_export.DTYPES:
        raise SparkGPTError(f"--dtype {dtype} is a GGUF type; name the output OUT.gguf to write a GGUF file")
    lm = sparkgpt.load(args.src, dtype=dtype, device="cpu")
    print(f"wrote {lm.save(args.dst)} ({dtype})")


def cmd_quantize(args: argparse.Namespace) -> None:
    """Write a model reference as a quantised checkpoint (int8 or int4 weights with their scales), which
    `sparkgpt.load` and every command read back as is, without quantising again."""
    import sparkgpt

    lm = sparkgpt.load(args.src, device="cpu", quantize=args.method)
    print(f"wrote {lm.save(args.dst)} ({args.method})")


def cmd_prepare(args: argparse.Namespace) -> None:
    """Clean, deduplicate and tokenise text, JSONL, parquet, Wikipedia dumps, WET/WARC or a built-in corpus into
    train/val token shards."""
    from sparkgpt.data import prepare
    from sparkgpt.data.clean import CleanConfig
    from sparkgpt.data.vqa import prepare_easy_vqa

    if args.inputs == ["easy-vqa"]:  # images with questions, not text: an image question folder
        counts = prepare_easy_vqa(args.out)
        print(f"wrote {args.out}: easy-VQA, {counts['train']:,} train, {counts['val']:,} val and {counts['test']:,} "
              "test questions with their images")
        return

    dedup = {part.strip() for part in args.dedup.split(",") if part.strip()}
    if not dedup <= {"exact", "near", "none"} or ("none" in dedup and len(dedup) > 1):
        raise SparkGPTError(f"--dedup {args.dedup!r}: expected exact, near, both (exact,near) or none")
    languages = tuple(code.strip() for code in (args.languages or "").split(",") if code.strip())
    clean = CleanConfig(quality=args.quality, languages=languages, exact_dedup="exact" in dedup,
                        near_dedup="near" in dedup)
    result = prepare(args.inputs, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                     text_field=args.text_field, workers=args.workers, format=args.format, clean=clean,
                     engine=args.engine, shard_tokens=args.shard_tokens)
    for stage in result.stages:
        if stage["stage"] == "read":
            print(f"{'read':<17} {stage['documents']:,} documents, {stage['characters']:,} characters"
                  f" ({stage['skipped_records']:,} records skipped)")
        elif stage["stage"] != "tokenize" and stage["removed_documents"]:
            rules = ", ".join(f"{rule} {count:,}" for rule, count in stage.get("removed_by", {}).items())
            print(f"{stage['stage']:<17} removed {stage['removed_documents']:,} documents "
                  f"({stage['removed_characters']:,} characters){f': {rules}' if rules else ''}")
    print(f"duplicates: {result.duplicates:,} removed")
    print(f"wrote {result.out_dir}: {result.train_tokens:,} train + {result.val_tokens:,} val tokens "
          f"({result.dtype}) in {result.shards} shard{'s' if result.shards != 1 else ''}, vocabulary "
          f"{result.vocab_size:,}, {result.documents:,} documents")


def cmd_train(args: argparse.Namespace) -> None:
    """Train a GPT on prepared data (also under torchrun for data parallelism); --resume continues a run."""
    from sparkgpt.train import train

    overrides = _overrides(args)
    if args.data is not None:
        overrides["data"] = args.data
    _report(train(args.config, args.out, overrides=overrides, resume=args.resume, progress=not args.quiet))


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    """The --KEY=VALUE config overrides given (`_add_config_overrides`)."""
    return {key.removeprefix("override:"): value for key, value in vars(args).items() if key.startswith("override:")}


def _report(result) -> bool:
    """Print where a training run ended (rank 0 only); whether it printed."""
    if result.checkpoint is None or int(os.environ.get("RANK", "0")) != 0:
        return False
    val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"step {result.step}: train loss {result.train_loss:.4f}{val}; checkpoint {result.checkpoint}")
    if result.best_checkpoint not in (None, result.checkpoint):
        print(f"lowest validation loss: {result.best_checkpoint}")
    return True


def cmd_finetune(args: argparse.Namespace) -> None:
    """Fine-tune a pretrained model on JSONL (chat, prompt/completion, text; or labeled texts with --task classify),
    in full or with LoRA adapters; --resume continues a run."""
    from sparkgpt.train import finetune

    overrides = _overrides(args)
    if args.data is None and not args.resume:
        raise SparkGPTError("--data is required: a JSONL file of training records")
    result = finetune(args.ref, args.data, args.out, val=args.val, method=args.method, task=args.task,
                      config=args.config, overrides=overrides, resume=args.resume, progress=not args.quiet)
    if _report(result):
        chosen = result.best_checkpoint or result.checkpoint  # the lowest validation loss, as the run chose it
        print(f"use it: sparkgpt {'classify' if args.task == 'classify' else 'chat'} {chosen}")


def cmd_distill(args: argparse.Namespace) -> None:
    """Distill a teacher model into a student trained from scratch on data prepared with the teacher's tokenizer:
    KL to the teacher's softened distribution plus cross-entropy; --resume continues a run."""
    from sparkgpt.train import distill

    overrides = _overrides(args)
    if not args.resume and not (args.teacher and args.student and args.data):
        raise SparkGPTError("--teacher, --student and --data are required (unless --resume)")
    result = distill(args.teacher, args.student, args.data, args.out, overrides=overrides, resume=args.resume,
                     progress=not args.quiet)
    _report(result)


def cmd_merge_lora(args: argparse.Namespace) -> None:
    """Merge a LoRA adapter into its base model and write one HF-compatible checkpoint directory."""
    import sparkgpt

    lm = sparkgpt.load(args.base, dtype=args.dtype, device="cpu", adapter=args.adapter)
    print(f"wrote {lm.save(args.out)} ({args.dtype})")


def cmd_classify(args: argparse.Namespace) -> None:
    """Label texts with a fine-tuned classification head: print each label and its probabilities, or with --data
    (labeled JSONL) the accuracy and confusion matrix."""
    from sparkgpt.evaluate.classification import classification_report, format_report

    lm = _load(args)
    if args.data is not None:
        report = classification_report(lm, args.data)
        print(format_report(report))
        return
    if args.text:
        texts = args.text
    elif args.file:
        try:
            texts = [line for line in Path(args.file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as error:
            raise SparkGPTError(f"{args.file}: cannot read ({error.strerror})") from None
    else:
        texts = [sys.stdin.read()]
    for probabilities in lm.classify(texts):
        label = max(probabilities, key=probabilities.get)
        shown = "  ".join(f"{name} {value:.3f}" for name, value in probabilities.items())
        print(f"{label}\t{shown}")


def cmd_plan(args: argparse.Namespace) -> None:
    """Estimate training memory per rank (weights, gradients, optimizer state, activations) and the largest
    micro-batch that fits a device, for any model or training preset."""
    from sparkgpt.train.plan import plan_config

    if not args.device_memory > 0:
        raise SparkGPTError(f"--device-memory is {args.device_memory}; expected a positive number of GiB")
    memory_plan = plan_config(args.config, world_size=args.world_size, parallel=args.parallel,
                              activation_checkpointing=args.activation_checkpointing, dtype=args.dtype,
                              block_size=args.block_size)
    print(memory_plan.report(args.device_memory))


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (continuous batching) with a web chat page at /;
    with --index, chat replies are grounded in a search index and cite it."""
    from sparkgpt.checkpoint.registry import resolve
    from sparkgpt.rag import Index
    from sparkgpt.serve.server import ConnectionLimits, serve

    if args.max_concurrency < 1 or args.max_queue < 0 or not 0 <= args.port <= 65535:
        raise SparkGPTError("--max-concurrency must be >= 1, --max-queue >= 0 and --port in 0..65535")
    if args.context is not None and args.context < 2:
        raise SparkGPTError("--context must be at least 2 tokens")
    if args.k < 1:
        raise SparkGPTError("--k must be at least 1")
    if args.max_body_bytes < 1 or args.max_connections < 1 or not args.timeout_receive > 0:
        raise SparkGPTError("--max-body-bytes and --max-connections must be at least 1, --timeout-receive above 0")
    if not args.shutdown_timeout >= 0:
        raise SparkGPTError(f"--shutdown-timeout must be 0 or more seconds, got {args.shutdown_timeout}")
    if args.prefix_cache_mb is not None and not args.prefix_cache_mb >= 0:
        raise SparkGPTError(f"--prefix-cache-mb must be 0 or more, got {args.prefix_cache_mb}")
    path = resolve(args.ref)  # a bad reference fails here, before the port is bound
    index = Index.load(args.index) if args.index else None  # and so does a bad index
    model_name = args.model_name or (args.ref if not Path(args.ref).exists() else path.stem if path.is_file()
                                     else path.name)
    # The key may come from the environment, so that it does not show in the process list.
    api_key = args.api_key or os.environ.get("SPARKGPT_API_KEY") or None
    serve(lambda: _load(args), model_name, host=args.host, port=args.port, api_key=api_key,
          max_slots=args.max_concurrency, max_queue=args.max_queue, context=args.context,
          prefill_chunk=args.prefill_chunk, threads=args.threads, log_level=args.log_level, index=index, k=args.k,
          max_body_bytes=args.max_body_bytes, shutdown_timeout=args.shutdown_timeout,
          prefix_cache_bytes=None if args.prefix_cache_mb is None else int(args.prefix_cache_mb * 2**20),
          limits=ConnectionLimits(max_connections=args.max_connections, receive_timeout=args.timeout_receive))


def _add_config_overrides(parser: argparse.ArgumentParser, own: tuple[str, ...] = ("data",)) -> None:
    """--KEY=VALUE for every TrainConfig key but the command's `own` options, --model.FIELD=VALUE for every model
    field, an image front end's included (values parsed later)."""
    import dataclasses

    from sparkgpt.config import ImageTextConfig
    from sparkgpt.train.config import TrainConfig

    group = parser.add_argument_group("config overrides (on top of --config; see sparkgpt/train/config.py)")
    for field in dataclasses.fields(TrainConfig):
        if field.name not in (*own, "model_overrides"):
            group.add_argument(f"--{field.name}", dest=f"override:{field.name}", metavar="V", default=argparse.SUPPRESS)
    for field in dataclasses.fields(ImageTextConfig):
        group.add_argument(f"--model.{field.name}", dest=f"override:model.{field.name}", metavar="V",
                           default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _add_run_options(parser: argparse.ArgumentParser, out_help: str, own: tuple[str, ...] = ("data",)) -> None:
    """--out, --resume, --quiet and the config overrides of a command that starts a training run."""
    parser.allow_abbrev = False  # --lr must never silently mean --lr_something
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_overrides(parser, own)


def cmd_index(args: argparse.Namespace) -> None:
    """Build (or update) a hybrid search index over text, Markdown, HTML, PDF and JSONL files and folders."""
    from sparkgpt.rag import Index

    index = Index.build(args.paths, args.out, embedder=args.embedder, chunk_tokens=args.chunk_tokens,
                        overlap=args.overlap, progress=not args.quiet)
    print(index.report.summary())
    print(f"wrote {args.out}")


def cmd_ask(args: argparse.Namespace) -> None:
    """Answer a question grounded in an index (with [n] citations) or a knowledge graph; closed-book without."""
    import json

    from sparkgpt import tasks
    from sparkgpt.rag import Embedder, Index
    from sparkgpt.rag.graph import KnowledgeGraph

    if args.index and args.graph:
        raise SparkGPTError("give --index or --graph, not both")
    if not args.question.strip():
        raise SparkGPTError("--question is empty")
    index = Index.load(args.index) if args.index else None
    embedder = Embedder.load(args.embedder) if args.graph and args.embedder != "none" else None
    graph = KnowledgeGraph.load(args.graph, embedder=embedder) if args.graph else None
    lm = _load(args)
    reply = tasks.answer(lm, args.question, index=index, graph=graph, k=args.k, mode=args.mode,
                         constrain=args.constrain, max_new_tokens=args.max_new_tokens)
    grounded = reply if isinstance(reply, tasks.GroundedAnswer) else tasks.GroundedAnswer(reply)
    if args.json:
        print(json.dumps(grounded.to_json(), ensure_ascii=False))
        return
    print(grounded.answer)
    for n, hit in enumerate(grounded.sources, start=1):
        print(f"[{n}] {hit.chunk.source} (characters {hit.chunk.start}-{hit.chunk.end}, score {hit.score:.4f})")
    for fact in grounded.facts or ():
        print(f"- {fact}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Score a model on a task (bundled name, YAML, JSONL or .txt for perplexity); print a table, save JSON."""
    from sparkgpt.evaluate.harness import evaluate

    lm = _load(args)
    report = evaluate(lm, args.task, shots=args.shots, limit=args.limit, seed=args.seed,
                      chat={"auto": None, "on": True, "off": False}[args.chat_template], batch_size=args.batch_size)
    print(report.table())
    if args.out:
        report.save(args.out)
        print(f"wrote {args.out}")


def cmd_task(args: argparse.Namespace) -> None:
    """Run a zero-/few-shot application: classify, answer, translate, summarize, keywords, correct, continue, story."""
    from sparkgpt import tasks

    lm = _load(args)
    text = args.text if args.text is not None else sys.stdin.read()
    if args.name == "classify":
        if not args.labels:
            raise SparkGPTError("classify needs --labels, e.g. --labels positive,negative")
        probabilities = tasks.classify(lm, text, args.labels.split(","), calibrate=args.calibrate)
        for label, probability in sorted(probabilities.items(), key=lambda kv: -kv[1]):
            print(f"{label}\t{probability:.3f}")
        print(f"prompt format: {probabilities.choice.name} ({probabilities.choice.reason})", file=sys.stderr)
        return
    runs = {
        "answer": lambda: tasks.answer(lm, text, context=args.context),
        "translate": lambda: tasks.translate(lm, text, source=args.source, target=args.target),
        "summarize": lambda: tasks.summarize(lm, text, max_words=args.max_words),
        "keywords": lambda: ", ".join(tasks.keywords(lm, text, k=args.k)),
        "correct": lambda: tasks.correct(lm, text),
        "continue": lambda: tasks.continue_text(lm, text),
        "story": lambda: tasks.write_story(lm, text),
    }
    print(runs[args.name]())


def _sampling(args: argparse.Namespace) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop=args.stop or (), seed=args.seed,
        num_beams=args.num_beams, length_penalty=args.length_penalty,
    )


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def cmd_transcribe(args: argparse.Namespace) -> None:
    """Transcribe audio files (WAV, FLAC, OGG, MP3) with a Whisper model (whisper-base): one transcript per file,
    in 30 s windows. An unreadable file is a one-line error naming it; the others are still transcribed."""
    import json

    from sparkgpt.tasks.transcribe import transcribe, whisper_prompt

    if args.beam_size < 1:
        raise SparkGPTError(f"--beam-size is {args.beam_size}; expected at least 1")
    lm = _load(args)
    whisper_prompt(lm, args.language)  # a text model or an unknown language: refused before any file is read
    failed = 0
    for path in args.audio:
        try:
            text = transcribe(lm, path, language=args.language, beam_size=args.beam_size)
        except SparkGPTError as error:
            print(f"sparkgpt: error: {error}", file=sys.stderr, flush=True)
            failed += 1
            continue
        print(json.dumps({"file": path, "text": text}, ensure_ascii=False) if args.json else text, flush=True)
    if failed:
        raise SystemExit(1)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref", help="model reference: a checkpoint directory (ours or transformers'), a LoRA adapter "
                        "folder, a training run folder, a .gguf file, an alias (smollm2-135m-instruct) or a hub id")
    parser.add_argument("--adapter", help="a LoRA adapter folder (ours or PEFT's) to apply to the model")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ...")
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None,
                        help="store the weight matrices as int8 or int4 (smaller, faster decoding on a CPU)")


def _load(args: argparse.Namespace):
    """The model the command's options name (`_add_model_options`)."""
    import sparkgpt

    return sparkgpt.load(args.ref, dtype=args.dtype, device=args.device, adapter=args.adapter,
                         quantize=args.quantize)


def _add_sampling_options(
    parser: argparse.ArgumentParser, max_new_tokens: int | None = 64, temperature: float = 0.8, top_p: float = 1.0
) -> None:
    """None for `max_new_tokens`: the command decides (chat: 512, or what the model's context leaves)."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                        help=f"tokens to generate at most ({max_new_tokens or '512, within the context'})")
    parser.add_argument("--temperature", type=float, default=temperature,
                        help=f"0 is greedy; higher is more varied ({temperature})")
    parser.add_argument("--top-k", type=int, default=None, help="sample only among the K most likely tokens")
    parser.add_argument("--top-p", type=float, default=top_p,
                        help=f"nucleus sampling: keep tokens up to mass P ({top_p})")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1.0)")
    parser.add_argument("--stop", action="append", help="stop when this text appears (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: sampling)")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="beam search scores log p / length^this (1.0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparkgpt", description="Train, run and serve GPT models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=handler.__doc__, description=handler.__doc__)
        sub.set_defaults(handler=handler)
        return sub

    command("models", cmd_models)
    info = command("info", cmd_info)
    info.add_argument("--json", action="store_true", help="print one JSON object")

    evaluate = command("evaluate", cmd_evaluate)
    _add_model_options(evaluate)
    evaluate.add_argument("--task", required=True, help="a bundled task (sentiment, topic, intent, reading_qa, "
                          "translation_en_fr|en_es|en_de|en_zh|fr_en, summarization, keywords, correction) or a "
                          ".yaml/.jsonl/.txt file")
    evaluate.add_argument("--shots", type=int, default=0, help="solved examples shown before each item (0)")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    evaluate.add_argument("--seed", type=int, default=1234, help="seed for choosing few-shot examples (1234)")
    evaluate.add_argument("--chat-template", choices=["auto", "on", "off"], default="auto",
                          help="wrap prompts in the model's chat template, a choice scored as the assistant's reply "
                               "(auto: multiple choice picks by leave-one-out accuracy on the few-shot items)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="generation tasks: prompts per batch (8)")
    evaluate.add_argument("--out", help="write the report (metrics and every item's prediction) as JSON")

    task = command("task", cmd_task)
    task.add_argument("name", choices=["classify", "answer", "translate", "summarize", "keywords", "correct",
                                       "continue", "story"])
    _add_model_options(task)
    task.add_argument("--text", help="the input (question for answer, premise for story); default: stdin")
    task.add_argument("--labels", help="classify: comma-separated labels")
    task.add_argument("--no-calibrate", dest="calibrate", action="store_false", default=None,
                      help="classify: skip the correction of label bias measured on a content-free input "
                      "(default: the prompt format's own choice)")
    task.add_argument("--context", help="answer: the passage to answer from (closed-book without it)")
    task.add_argument("--source", default="English", help="translate: source language (English)")
    task.add_argument("--target", default="French", help="translate: target language (French)")
    task.add_argument("--max-words", type=int, default=30, help="summarize: length limit in words (30)")
    task.add_argument("--k", type=int, default=5, help="keywords: how many (5)")
    transcribe = command("transcribe", cmd_transcribe)
    _add_model_options(transcribe)
    transcribe.add_argument("audio", nargs="+", metavar="AUDIO", help="audio files (WAV, FLAC, OGG, MP3)")
    transcribe.add_argument("--language", default="en", help="the language spoken, as Whisper names it (en)")
    transcribe.add_argument("--beam-size", type=int, default=5, help="beams per 30 s window; 1 is greedy (5)")
    transcribe.add_argument("--json", action="store_true", help='one JSON object per file: {"file", "text"}')
    index = command("index", cmd_index)
    index.add_argument("paths", nargs="+", metavar="PATH", help="files and folders (.txt .md .html .pdf .jsonl)")
    index.add_argument("--out", required=True, help="the index folder (updated in place if it exists)")
    index.add_argument("--embedder", default="minilm-l6", help="sentence-embedding model (minilm-l6)")
    index.add_argument("--chunk-tokens", type=int, default=254, help="chunk size in the embedder's tokens (254)")
    index.add_argument("--overlap", type=int, default=32, help="tokens shared by neighbouring chunks (32)")
    index.add_argument("--quiet", action="store_true", help="no progress bars")

    ask = command("ask", cmd_ask)
    _add_model_options(ask)
    ask.add_argument("--question", required=True, help="the question")
    ask.add_argument("--index", help="an index folder (sparkgpt index) to ground the answer in")
    ask.add_argument("--graph", help="a knowledge graph: JSONL {subject, relation, object} or TSV triples")
    ask.add_argument("--k", type=int, default=4, help="chunks retrieved (4)")
    ask.add_argument("--mode", choices=["hybrid", "bm25", "dense"], default="hybrid", help="retrieval (hybrid)")
    ask.add_argument("--embedder", default="minilm-l6", help="graph: the model that links names and relations "
                     "by meaning when words do not match (minilm-l6; none: words only)")
    ask.add_argument("--no-constrain", dest="constrain", action="store_false",
                     help="graph: let the model write its answer instead of choosing one of the graph's entities")
    ask.add_argument("--max-new-tokens", type=int, default=96, help="answer length at most (96)")
    ask.add_argument("--json", action="store_true", help='print {"answer", "sources"|"facts"} as one JSON object')

    generate = command("generate", cmd_generate)
    _add_model_options(generate)
    generate.add_argument("--prompt", required=True, help="the text to continue")
    generate.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    _add_sampling_options(generate)

    embed = command("embed", cmd_embed)
    _add_model_options(embed)
    embed.add_argument("--text", action="append", required=True, help="a text to embed (repeatable)")

    chat = command("chat", cmd_chat)
    _add_model_options(chat)
    chat.add_argument("--system", help="system prompt that starts the conversation")
    chat.add_argument("--message", help="send one message, print the reply and exit (for scripts)")
    chat.add_argument("--image", metavar="PATH", help="an image the conversation is about (a model that reads images, "
                      "e.g. one trained with --config easy-vqa)")
    # Small chat models answer best near-greedy: SmolLM2's card suggests temperature 0.2, top-p 0.9.
    _add_sampling_options(chat, max_new_tokens=None, temperature=0.2, top_p=0.9)

    convert = command("convert", cmd_convert)
    convert.add_argument("src", help="model reference to read (directory, .gguf file, alias or hub id)")
    convert.add_argument("dst", help="output directory (HF-compatible checkpoint), or OUT.gguf (a GGUF file)")
    convert.add_argument("--dtype", default=None, help="weights' dtype: float32 (default), bfloat16, float16; "
                         "for .gguf: f16 (default), q8_0, q4_0, f32")

    quantize = command("quantize", cmd_quantize)
    quantize.add_argument("src", help="model reference to read (directory, .gguf file, alias or hub id)")
    quantize.add_argument("dst", help="output directory (a quantised checkpoint)")
    quantize.add_argument("--method", choices=["int8", "int4"], default="int8",
                          help="int8: per-row scales (default); int4: groups of 32 with scale and zero")

    prepare = command("prepare", cmd_prepare)
    prepare.add_argument("inputs", nargs="+", metavar="INPUT",
                         help="files or folders (recursive): text, .jsonl[.gz|.zst], .parquet, MediaWiki .xml[.bz2], "
                              "Common Crawl .warc.wet.gz, .warc[.gz]; or a built-in corpus: shakespeare; or "
                              "easy-vqa (images with questions, for --config easy-vqa)")
    prepare.add_argument("--out", required=True, help="output folder (token shards, meta.json, tokenizer.json)")
    prepare.add_argument("--tokenizer", default="char",
                         help="char, bpe:VOCAB (train a byte-level BPE), or a model reference (use its tokenizer)")
    prepare.add_argument("--val-fraction", type=float, default=0.1, help="last fraction of tokens for validation")
    prepare.add_argument("--text-field", default="text",
                         help="the field of each JSONL record or parquet column holding text (text)")
    prepare.add_argument("--format", help="read every input as text, jsonl, parquet, mediawiki, wet or warc "
                                          "(default: chosen by each file's name)")
    prepare.add_argument("--quality", choices=["auto", "on", "off"], default="auto",
                         help="the Gopher and C4 quality rules: auto applies them to crawled web text (WET, WARC)")
    prepare.add_argument("--dedup", default="exact,near",
                         help="exact (document hash), near (MinHash LSH), both (default: exact,near) or none")
    prepare.add_argument("--languages", help="keep only these languages, e.g. en,fr (default: all)")
    prepare.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard at most (2**28)")
    prepare.add_argument("--engine", choices=["local", "ray"], default="local",
                         help="local worker processes, or ray (a local Ray cluster, or RAY_ADDRESS's)")
    prepare.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")

    train = command("train", cmd_train)
    train.add_argument("--config", help="a training preset (shakespeare-char, shakespeare-baby, gpt2, "
                       "sparkgpt-124m) or a YAML file")
    train.add_argument("--data", help="prepared data folder (sparkgpt prepare)")
    _add_run_options(train, "run folder: checkpoints, metrics.jsonl, loss.png, config.yaml")

    finetune = command("finetune", cmd_finetune)
    finetune.add_argument("ref", nargs="?", default="", help="the pretrained model (any model reference)")
    finetune.add_argument("--data", help="training JSONL: {messages}, {prompt, completion}, {text} "
                          "(or {text, label} with --task classify)")
    finetune.add_argument("--val", help="validation JSONL (default: a seeded random 10%% of --data, by label for "
                          "--task classify)")
    finetune.add_argument("--method", choices=["lora", "full", "dpo"], default="lora",
                          help="lora (default), full, or dpo (preference tuning with LoRA: --task dpo)")
    finetune.add_argument("--task", choices=["lm", "classify", "dpo"], default="lm",
                          help="lm (default): learn to write the targets; classify: a classification head; dpo: "
                          "learn from {prompt, chosen, rejected} pairs")
    finetune.add_argument("--config", help="a training preset (finetune-lora, finetune-full, finetune-dpo-lora, "
                          "finetune-dpo-full) or YAML file")
    _add_run_options(finetune, "run folder: checkpoints (adapters or models), metrics, plot",
                     own=("data", "init_from", "val_data", "method", "task"))

    distill = command("distill", cmd_distill)
    distill.add_argument("--teacher", help="the teacher: any model reference (directory, .gguf, alias, hub id)")
    distill.add_argument("--student", help="a training preset or YAML file (its model is the student), or a model "
                         "preset; built with the teacher's vocabulary")
    distill.add_argument("--data", help="prepared data folder (sparkgpt prepare ... --tokenizer TEACHER)")
    # --distill_temperature=2 --distill_alpha=0.5 are config overrides
    _add_run_options(distill, "run folder: checkpoints, metrics.jsonl, loss.png, config.yaml", own=("data", "teacher"))

    merge = command("merge-lora", cmd_merge_lora)
    merge.add_argument("base", help="the base model reference")
    merge.add_argument("adapter", help="the LoRA adapter folder")
    merge.add_argument("out", help="output directory (HF-compatible checkpoint)")
    merge.add_argument("--dtype", default="float32", help="weights' dtype: float32 (default), bfloat16, float16")

    classify = command("classify", cmd_classify)
    _add_model_options(classify)
    classify.add_argument("--text", action="append", help="a text to label (repeatable); default: --file or stdin")
    classify.add_argument("--file", help="a text file, one text per line")
    classify.add_argument("--data", help="labeled JSONL ({text, label}): print accuracy and the confusion matrix")

    plan = command("plan", cmd_plan)
    plan.add_argument("--config", required=True, help="a model preset (gpt2-xl, llama-7b, ...: `sparkgpt models`), "
                      "a training preset or a YAML file")
    plan.add_argument("--world-size", type=int, default=1, help="training processes (GPUs) in all (1)")
    plan.add_argument("--device-memory", type=float, required=True, help="memory of one device, in GiB")
    plan.add_argument("--parallel", choices=["ddp", "fsdp"], default=None, help="ddp replicates, fsdp shards "
                      "(default: the config's, else ddp)")
    plan.add_argument("--activation-checkpointing", action="store_true", default=None,
                      help="recompute each block in the backward (default: the config's)")
    plan.add_argument("--dtype", default=None, help="compute dtype: bfloat16 (default for a model preset), float16, "
                      "float32")
    plan.add_argument("--block-size", type=int, default=None,
                      help="tokens per sequence (default: the config's block_size, or the model's context)")

    serve = command("serve", cmd_serve)
    _add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (8000)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 and /metrics "
                       "(or set SPARKGPT_API_KEY)")
    serve.add_argument("--max-concurrency", type=int, default=8, help="sequences decoded together (8)")
    serve.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 429")
    serve.add_argument("--model-name", help="the model id clients ask for (default: the reference's name)")
    serve.add_argument("--context", type=int, default=None,
                       help="tokens per sequence, prompt + max_tokens (default: the model's, at most 4096)")
    serve.add_argument("--prefill-chunk", type=int, default=256,
                       help="prompt tokens prefilled between decode steps at most (256)")
    serve.add_argument("--prefix-cache-mb", type=float, default=None,
                       help="memory for the keys/values of finished requests, which later prompts that start the "
                       "same way (a chat's earlier turns) copy instead of computing (default: a quarter of the "
                       "slots' cache; 0: none)")
    serve.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument("--index", help="an index folder (sparkgpt index): chat replies are grounded in it and return "
                       "their sources")
    serve.add_argument("--k", type=int, default=4, help="chunks retrieved per chat reply with --index (4)")
    serve.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                       help="a request body over this many bytes is refused with 413 (4 MiB)")
    serve.add_argument("--max-connections", type=int, default=512,
                       help="connections open at once; one more is answered 503 and closed (512)")
    serve.add_argument("--timeout-receive", type=float, default=30.0,
                       help="seconds a request may take to arrive, headers and body; then 408 (30)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="on SIGTERM, seconds the requests in flight may run on while new ones get 503 (30)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except SparkGPTError as error:
        print(f"sparkgpt: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sparkgpt: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
