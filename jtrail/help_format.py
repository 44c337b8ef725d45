"""The `--help` format of every jtrail command: each option shows its default, as vLLM's do."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """'(default: X)' after every option with a meaningful default; options without help text get one
    too (argparse prints no line for them otherwise). None/False defaults (off, or 'see text') stay
    silent, and a help that already names its default keeps its own words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (action.default in (None, False) or action.default is argparse.SUPPRESS
                or not action.option_strings or "default" in text.lower()):
            return action.help
        return f"{text} (default: %(default)s)".strip()

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings and action.default not in (None, False):
            action.help = "(default: %(default)s)"  # argparse prints no help column for an empty help
        return super()._format_action(action)


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser with `HelpFormatter` (the subparsers inherit it through parser_class)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
