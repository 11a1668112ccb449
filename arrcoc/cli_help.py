"""The help formatter of every ``arrcoc`` command's parser, the module commands' (``compress-dataset``) among them."""

from __future__ import annotations

import argparse

__all__ = ["HelpFormatter"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help line, unless the help already names it or there is none (``None``: the
    help says what happens); descriptions and epilogs as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return text if "default" in text or action.default is None else super()._get_help_string(action)
