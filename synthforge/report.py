"""A published version's dataset card as one standalone HTML page: figures inlined, no external resources."""

from __future__ import annotations

import base64
import html
import os
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml

from synthforge.errors import BadInput

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; line-height: 1.5;
       max-width: 980px; margin: 2rem auto; padding: 0 1rem; color: #1f2328; }
h1, h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
table { border-collapse: collapse; margin: 1rem 0; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; }
th { background: #f6f8fa; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .85rem; }
pre { background: #f6f8fa; padding: .8rem; overflow-x: auto; border-radius: 6px; }
img { max-width: 100%; height: auto; }
blockquote { margin: 1rem 0; padding: .5rem 1rem; border-left: 4px solid #d1242f; background: #fff5f5; }
details { margin: .4rem 0; }
summary { cursor: pointer; }
table.metadata { font-size: .8rem; }
"""


def _split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    if not text.startswith("---\n"):
        return {}, text
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front) or {}, body


def _metadata_table(meta: dict[str, Any]) -> str:
    """The Hub metadata a reader cares about (the feature schema and file globs stay in README.md)."""
    splits = (meta.get("dataset_info") or {}).get("splits") or []
    rows = [
        ("license", meta.get("license")),
        ("tags", ", ".join(meta.get("tags") or [])),
        ("size", ", ".join(meta.get("size_categories") or [])),
        ("splits", ", ".join(f"{s['name']} ({s['num_examples']})" for s in splits)),
    ]
    cells = "".join(f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows if v)
    return f'<table class="metadata">{cells}</table>' if cells else ""


def _inline_images(tokens: list, version_dir: Path, readme: Path) -> None:
    """Replace every image source by a data: URI of the PNG it names inside the version."""
    root = version_dir.resolve()
    for token in tokens:
        for child in token.children or []:
            if child.type != "image":
                continue
            src = str(child.attrGet("src"))
            path = (root / unquote(src)).resolve()  # markdown-it percent-encodes the link
            if not src.endswith(".png") or not path.is_relative_to(root) or not path.is_file():
                raise BadInput(f"{readme}: image {src!r} is not a PNG file of the version in {version_dir}")
            child.attrSet("src", "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii"))


def write_report(version_dir: Path, out: Path) -> Path:
    """Write the dataset card of the version in `version_dir` (README.md and its images/) to `out` as one HTML
    file that opens anywhere offline. Returns `out`."""
    from markdown_it import MarkdownIt

    readme = version_dir / "README.md"
    if not readme.is_file():
        raise BadInput(f"{version_dir}: no README.md (not a published version?)")
    meta, body = _split_front_matter(readme.read_text())
    md = MarkdownIt("commonmark").enable("table")
    tokens = md.parse(body)
    _inline_images(tokens, version_dir, readme)
    # The metadata table goes under the card's title, the first heading.
    head = next((i + 1 for i, t in enumerate(tokens) if t.type == "heading_close"), 0)
    title = next((t.content for t in tokens[:head] if t.type == "inline"), meta.get("pretty_name") or version_dir.name)
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(str(title))}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"{md.renderer.render(tokens[:head], md.options, {})}{_metadata_table(meta)}\n"
        f"{md.renderer.render(tokens[head:], md.options, {})}</body>\n</html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")  # beside `out`: the rename stays on one filesystem
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
