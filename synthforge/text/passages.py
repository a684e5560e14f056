"""Passages of real documents for source-grounded generation: a folder of text, markdown and JSONL files.

Text and markdown are cut at headings and blank lines into passages of at most `max_words` words (a paragraph is
never split; a longer one stays whole); each passage remembers the heading it sits under. A JSONL file holds one
passage per line with `id` and `text` (and optionally `title`). A passage id is `<file>#<n>` (`<file>#<id>` for
JSONL), stable as long as the file does not change, and goes into every sample's `provenance.source`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from synthforge.errors import BadInput
from synthforge.provenance import sha256_hex
from synthforge.sources import read_jsonl

TEXT_SUFFIXES = {".txt", ".md", ".markdown"}
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")


@dataclass(frozen=True)
class Passage:
    id: str
    uri: str  # the document file
    index: int  # 0-based position among the file's passages
    title: str  # the heading the passage sits under (or the file name)
    text: str

    @property
    def words(self) -> int:
        return len(self.text.split())


def load_passages(folder: str | Path, max_words: int = 180, min_words: int = 12) -> list[Passage]:
    """Every passage of every .txt/.md/.jsonl file under folder (sorted by path)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(f"{folder}: document folder not found")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.suffix == ".jsonl"))
    if not files:
        raise BadInput(f"{folder}: no documents (.txt, .md or .jsonl files)")
    passages: list[Passage] = []
    for path in files:
        name = path.relative_to(folder).as_posix()
        found = _jsonl_passages(path, name) if path.suffix == ".jsonl" else _text_passages(path, name, max_words, min_words)
        passages += found
    if not passages:
        raise BadInput(f"{folder}: the documents hold no passage of at least {min_words} words")
    return passages


def passages_digest(passages: list[Passage]) -> str:
    return sha256_hex("\n".join(f"{p.id}\t{p.title}\t{p.text}" for p in passages))


def _text_passages(path: Path, name: str, max_words: int, min_words: int) -> list[Passage]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path}: not UTF-8 text (byte {exc.start})") from None
    title = path.stem
    sections: list[tuple[str, list[str]]] = [(title, [])]
    paragraph: list[str] = []

    def close_paragraph() -> None:
        if paragraph:
            sections[-1][1].append(" ".join(line.strip() for line in paragraph))
            paragraph.clear()

    for line in text.splitlines():
        heading = _HEADING.match(line)
        if heading:
            close_paragraph()
            sections.append((heading.group(1).strip() or title, []))
        elif line.strip():
            paragraph.append(line)
        else:
            close_paragraph()
    close_paragraph()

    out: list[Passage] = []
    for heading, paragraphs in sections:
        chunk: list[str] = []
        for para in paragraphs:
            if chunk and len(" ".join(chunk + [para]).split()) > max_words:
                out.append(_passage(path, name, len(out), heading, chunk))
                chunk = []
            chunk.append(para)
        if chunk:
            out.append(_passage(path, name, len(out), heading, chunk))
    kept = [p for p in out if p.words >= min_words]
    # Renumber after dropping stubs so ids stay dense and follow the file's order.
    return [Passage(f"{name}#{i + 1}", p.uri, i, p.title, p.text) for i, p in enumerate(kept)]


def _passage(path: Path, name: str, index: int, title: str, paragraphs: list[str]) -> Passage:
    return Passage(f"{name}#{index + 1}", str(path), index, title, "\n\n".join(paragraphs))


def _jsonl_passages(path: Path, name: str) -> list[Passage]:
    out: list[Passage] = []
    seen: dict[str, int] = {}
    for lineno, record in read_jsonl(path):
        pid, text = record.get("id"), record.get("text")
        if not isinstance(pid, str) or not pid:
            raise BadInput(f"{path}:{lineno}: a passage needs a non-empty string 'id'")
        if not isinstance(text, str) or not text.strip():
            raise BadInput(f"{path}:{lineno}: passage {pid!r} needs a non-empty string 'text'")
        if pid in seen:
            raise BadInput(f"{path}:{lineno}: duplicate passage id {pid!r} (first on line {seen[pid]})")
        seen[pid] = lineno
        out.append(Passage(f"{name}#{pid}", str(path), len(out), str(record.get("title") or path.stem), text.strip()))
    return out
