"""`jtrail` command line. Each subcommand is one `add_<name>(subparsers)` function that builds its parser
and sets `func`; heavy imports (JAX, the model) happen inside the handler so `jtrail --help` is fast.

To add a subcommand: write `add_serve(sub)` (here or in its own module) and append it to `COMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from jtrail import __version__
from jtrail.client_cli import add_chat, add_client
from jtrail.help_format import Parser
from jtrail.probe.cli import add_train_probe
from jtrail.probe.estimator_cli import add_train_prompt_estimator
from jtrail.serve import add_route, add_serve


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="a .gguf file, Hugging Face dir, jtrail checkpoint dir or named shape "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def _run_generate(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from jtrail.llm import LLM
    from jtrail.serving.sequence import SamplingParams

    if not args.prompt and not args.mt_bench:
        print("jtrail generate: give a prompt or --mt-bench N", file=sys.stderr)
        return 2
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    llm = LLM(args.model, dtype=jnp.dtype(args.dtype))
    if args.mt_bench:
        from jtrail.datasets import load_mtbench

        questions = [q.turns[0] for q in load_mtbench()[: args.mt_bench]]
    else:
        questions = [args.prompt]
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": q}] for q in questions], params)
    else:
        outs = llm.generate(questions, params)
    for q, o in zip(questions, outs, strict=True):
        if len(questions) > 1:
            print(f"### Q: {q}\n")
        print(o.text)
        if len(questions) > 1:
            print(f"\n[{o.completion_tokens} tokens, finish: {o.finish_reason.value}]\n")
    return 0


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion (default model: embedded SmolLM2)")
    p.add_argument("prompt", nargs="?", default=None)
    _model_args(p)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wrap the prompt in the model's chat template (default: on)",
    )
    p.add_argument(
        "--mt-bench", type=int, default=0, metavar="N", help="answer the first N MT-Bench questions"
    )
    p.set_defaults(func=_run_generate)


# One line per subcommand (serve, client, train-probe, train-prompt-estimator register here).
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_generate,
    add_serve,
    add_route,
    add_client,
    add_chat,
    add_train_probe,
    add_train_prompt_estimator,
]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="jtrail", description="JAX LLM serving with length-aware scheduling")
    parser.add_argument("--version", action="version", version=f"jtrail {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jtrail.log_setup import quiet_library_logs

    quiet_library_logs()  # before any command imports JAX
    from jtrail.models.errors import JtrailError

    try:
        return int(args.func(args) or 0)
    except JtrailError as e:  # the root of every typed error jtrail raises
        print(f"jtrail {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
