"""mkdocs hook: the command-line reference, generated at build time from erase's own argparse parsers.

docs/cli.md holds markers such as `<!-- cli-help: evaluate_parser -->`; each is replaced by the `--help` text of
`erase.cli.<name>()`. Every parser erase.cli defines must have its marker, so a new command cannot be missing
from the page: the build warns (and `mkdocs build --strict` fails) when one is left out or a marker names none.

It also makes `<name>` in running text literal, in the pages and in the docstrings mkdocstrings renders: erase's
docstrings write placeholders such as `<out>/<name>.safetensors`, which Markdown would otherwise take for HTML tags
and drop.
"""

from __future__ import annotations

import logging
import os
import re

from markdown import Markdown
from markdown.extensions import Extension

MARKER = re.compile(r"<!-- cli-help: (\w+) -->")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
WIDTH = "100"  # argparse wraps to the terminal's width: a fixed one gives the same page on every machine

log = logging.getLogger("mkdocs.hooks.cli_reference")


class LiteralAngleBrackets(Extension):
    """Inline `<word>` stays text: Markdown's inline raw-HTML pattern is switched off (block HTML is unchanged)."""

    def extendMarkdown(self, md: Markdown) -> None:  # Markdown's name for it
        md.inlinePatterns.deregister("html", strict=False)


def on_config(config, **kwargs):
    # The same list object reaches mkdocstrings' inner Markdown, so docstrings are converted with it too.
    config.markdown_extensions.append(LiteralAngleBrackets())
    return config


def parser_names(cli) -> set[str]:
    """The functions of erase.cli that build a parser: parser(), evaluate_parser(), apply_parser(), ..."""
    return {name for name in vars(cli) if name == "parser" or name.endswith("_parser")}


def help_text(cli, name: str) -> str:
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        text = getattr(cli, name)().format_help()
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return ANSI.sub("", text).rstrip()


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    names = MARKER.findall(markdown)
    if not names:
        return markdown
    from erase import cli  # the installed package (pip install -e ".[docs]")

    known = parser_names(cli)
    for name in sorted(set(names) - known):
        log.warning("%s: marker cli-help: %s names no parser of erase.cli (it has %s)", page.file.src_path, name,
                    ", ".join(sorted(known)))
    for name in sorted(known - set(names)):
        log.warning("%s: erase.cli.%s() is not on the page: add <!-- cli-help: %s -->", page.file.src_path, name, name)

    def block(match: re.Match) -> str:
        name = match.group(1)
        return f"```text\n{help_text(cli, name)}\n```" if name in known else match.group(0)

    return MARKER.sub(block, markdown)
