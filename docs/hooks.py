"""MkDocs hook: the site's home page is the README, read at build time (one copy, no drift). Links into docs/
become page links; links to repository files outside docs/ (not part of the site) become code spans."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_as_home(text: str) -> str:
    text = re.sub(r"\]\(docs/", "](", text)
    text = re.sub(r"\[(`[^`\]]+`)\]\((?!https?:)[^)#]+\)", r"\1", text)  # [`path`](path) -> `path`
    return text.replace("(docs/", "(")


def on_page_read_source(page, config) -> str | None:
    if page.file.src_uri == "index.md":
        return readme_as_home(README.read_text())
    return None
