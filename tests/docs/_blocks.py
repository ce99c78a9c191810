"""Fenced code blocks of a Markdown page, and the docs' convention for them.

- A ```python block is executed by tests/docs/test_guides.py. The blocks of one page run
  in order in one namespace (like a notebook), at the tiny sizes written in the page.
- A python block that must not run (it needs a download, a GPU, several processes, or
  minutes) is preceded by an HTML comment on its own line, invisible on the site:
  ``<!-- not-run: the reason -->``. The reason is required.
- Other blocks are shell commands or file contents and must say so in their info string:
  bash, text, toml or json. A bare ``` fence is refused, so no code hides from the tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

NON_PYTHON = {"bash", "text", "toml", "json"}
_FENCE = re.compile(r"^(`{3,})([^`\n]*)$")
_NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(.*?)\s*-->$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: str | None  # the reason, when marked


def blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i].strip())
        if not m:
            i += 1
            continue
        fence, info = m.group(1), m.group(2).strip()
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            j += 1
        prev = next((lines[p].strip() for p in range(i - 1, -1, -1) if lines[p].strip()), "")
        marked = _NOT_RUN.match(prev)
        lang = info.split()[0] if info else ""
        indent = len(lines[i]) - len(lines[i].lstrip())
        code = "\n".join(line[indent:] for line in lines[i + 1 : j])
        out.append(Block(path, i + 1, lang, code, marked.group(1) if marked else None))
        i = j + 1
    return out
