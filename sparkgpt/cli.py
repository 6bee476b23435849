"""The `sparkgpt` command: a thin skin over the Python API, one function per subcommand.

Every user error surfaces as a SparkGPTError: one line on stderr, exit status 1, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from sparkgpt.errors import SparkGPTError


def cmd_models(args: argparse.Namespace) -> None:
    """List the named model presets with their shapes and parameter counts."""
    from sparkgpt.config import PRESETS, preset

    print(f"{'preset':<16}{'family':<8}{'layers':>7}{'d_model':>9}{'heads':>7}{'kv':>5}{'context':>9}{'params':>10}")
    for name in PRESETS:
        config = preset(name)
        family = "llama" if config.positions == "rope" else "gpt2"
        print(f"{name:<16}{family:<8}{config.n_layers:>7}{config.d_model:>9}{config.n_heads:>7}{config.n_kv_heads:>5}"
              f"{config.max_seq_len:>9}{_human(config.num_parameters()):>10}")


def cmd_generate(args: argparse.Namespace) -> None:
    """Continue a prompt with a model and print the completion."""
    import sparkgpt

    lm = sparkgpt.load(args.ref, dtype=args.dtype, device=args.device)
    sampling = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop=args.stop or (), seed=args.seed,
    )
    if args.stream:
        for delta in lm.stream(args.prompt, **sampling):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(lm.generate(args.prompt, **sampling))


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ref", help="model reference: a checkpoint directory (ours or a transformers one)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ...")


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 is greedy; higher is more varied (0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="sample only among the K most likely tokens")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep tokens up to mass P (1.0)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1.0)")
    parser.add_argument("--stop", action="append", help="stop when this text appears (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparkgpt", description="Train, run and serve GPT models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=handler.__doc__, description=handler.__doc__)
        sub.set_defaults(handler=handler)
        return sub

    command("models", cmd_models)
    generate = command("generate", cmd_generate)
    _add_model_options(generate)
    generate.add_argument("--prompt", required=True, help="the text to continue")
    generate.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    _add_sampling_options(generate)
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
