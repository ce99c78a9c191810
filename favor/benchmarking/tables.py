"""Tables as text, the way ``favor bench`` and ``favor demo`` print them."""

from __future__ import annotations

__all__ = ["format_table"]


def format_table(
    title: str,
    header: list[str],
    rows: list[list],
    caption: str | None = None,
    *,
    indent: str = "",
    rule: bool = False,
) -> str:
    """A blank line, ``title``, then right-aligned columns under ``header`` (each line after
    ``indent``; ``rule`` draws dashes under the header) and a one-line caption. With no rows
    and no rule, only the title and caption."""
    cells = [[str(x) for x in r] for r in rows]
    lines = ["", title]
    if cells or rule:
        widths = [max(len(x) for x in col) for col in zip([str(h) for h in header], *cells, strict=True)]
        lines.append(indent + "  ".join(str(h).rjust(w) for h, w in zip(header, widths, strict=True)))
        if rule:
            lines.append(indent + "  ".join("-" * w for w in widths))
        lines += [indent + "  ".join(x.rjust(w) for x, w in zip(r, widths, strict=True)) for r in cells]
    if caption:
        lines.append(f"  -> {caption}")
    return "\n".join(lines)
