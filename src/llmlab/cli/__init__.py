"""The `llmlab` command: one verb per task, each a thin layer over the library. The only place argparse lives."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from llmlab.cli import align as align_cli
from llmlab.cli import attack as attack_cli
from llmlab.cli import bias, families, models, poison, privacy, report, scan, serve, supply_chain, truth, view
from llmlab.cli import harden as harden_cli
from llmlab.cli import train as train_cli
from llmlab.cli.common import Verb
from llmlab.errors import LlmlabError

# every verb, in the order `llmlab --help` lists them
VERBS: tuple[Verb, ...] = (
    models.cmd_attention, models.cmd_embed, models.cmd_info, models.cmd_export, train_cli.cmd_train,
    models.cmd_generate, models.cmd_perplexity, families.cmd_finetune, families.cmd_classify, families.cmd_dataset,
    privacy.cmd_privacy, scan.cmd_scan, serve.cmd_serve, report.cmd_report, truth.cmd_truth, bias.cmd_bias,
    view.cmd_view, view.cmd_induction, poison.cmd_poison, attack_cli.cmd_attack, harden_cli.cmd_harden,
    align_cli.cmd_align,
)
BY_NAME = {v.name: v for v in VERBS}


def build_parser() -> argparse.ArgumentParser:
    from llmlab import __version__

    p = argparse.ArgumentParser(prog="llmlab", description="Build, train, look inside, attack and defend "
                                "transformer language models.")
    p.add_argument("--version", action="version", version=f"llmlab {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    for v in VERBS:
        v.add_args(sub.add_parser(v.name, help=v.help, description=v.help))
    supply_chain.register(sub)  # audit, supply-chain (lab, keygen), sign, verify, convert
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; user errors print one line on stderr and return 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    a = parser.parse_args(argv)
    if not a.verb:
        parser.print_help()
        return 2
    try:
        if a.verb in BY_NAME:
            return BY_NAME[a.verb].run(a)
        return a.func(a)  # the verbs a module adds with register() (set_defaults(func=...))
    except LlmlabError as e:
        print(f"llmlab {a.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C; training's TrainingInterrupted says what was saved and how to go on
        print(f"llmlab {a.verb}: {str(e) or 'interrupted'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except BrokenPipeError:
        return 0
