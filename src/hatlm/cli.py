"""`hatlm` command line. Each subcommand lives in its own module, imported only when used, and
exposes `add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("hatlm.info", "parameter counts and memory estimates of a checkpoint or preset"),
    "demo": ("hatlm.demo", "the main job: built-in tasks, three-arm comparison, report"),
    "train": ("hatlm.train", "train one arm on a data file"),
    "eval": ("hatlm.evaluate", "evaluate a checkpoint on a data file"),
    "compare": ("hatlm.compare", "train and compare the causal, pause and hybrid arms"),
    "generate": ("hatlm.generate", "generate text from a checkpoint or preset"),
    "merge": ("hatlm.lora", "merge a LoRA adapter into its base model: a plain hatlm checkpoint"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hatlm", description="Hybrid attention transformers on Mistral")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            p.set_defaults(_missing=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if getattr(args, "_missing", False):
        print(f"hatlm {args.command}: not available in this version", file=sys.stderr)
        return 2
    from hatlm.errors import UserError

    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UserError as e:
        print(f"hatlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hatlm {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error worth a traceback.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
