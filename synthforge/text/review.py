"""Manual spot check: export a stratified sample for a person to review, import the verdicts, apply them.

    synthforge review export --in data/tagged --out review.csv   (or review.html)
    synthforge review import review.csv --reviewer alice         -> reviews/verdicts.jsonl
    synthforge judge (or dvc repro)                              -> the `review` check applies the verdicts

The sample is stratified by generation method, difficulty and judge-score bucket: every stratum present gets at
least one sample, the rest are spread in proportion to the strata's sizes, so rare methods and low scores are
seen too. The ledger holds one line per reviewed sample (sample_id, verdict, notes, reviewer, reviewed_at); a
sample reviewed again keeps its latest verdict, and git keeps the history.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synthforge.errors import BadInput
from synthforge.provenance import SAMPLE_ID, now_iso, read_manifest, sha256_hex
from synthforge.stagedir import Row, StageInput

LEDGER = "reviews/verdicts.jsonl"
SCORE_CHECK = "llm_judge"  # whose score the judge-score strata are made of
FIXED_COLUMNS = ("sample_id", "method", "difficulty", "judge_score")
VERDICT_COLUMNS = ("verdict", "rating", "notes")  # rating: the difficulty the reviewer gives (optional)
RATINGS = ("easy", "medium", "hard")
DEFAULT_FIELDS = ("prompt", "reference", "context")
# Spreadsheets hold at most 32,767 characters in a cell (and split longer ones across rows); Python's csv module reads
# at most 131,072. A longer text is cut in the review file, never in the data.
MAX_CELL = 32_000  # characters, leaving room for the note that says how many were cut


def _write_atomic(path: Path, text: str) -> None:
    """Write beside the target and rename, so a reader never sees half a file and a failure keeps the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8", newline="")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -- export ------------------------------------------------------------------------------------------------------


def _judge_score(prov: dict[str, Any]) -> tuple[float | None, str | None]:
    """The LLM judge's score and difficulty rating, when it judged the sample."""
    for check in (prov.get("judge") or {}).get("checks") or []:
        if check["name"] == SCORE_CHECK:
            return check["score"], check["difficulty"]
    return None, None


def stratum(row: Row) -> tuple[str, str, str]:
    """(method, difficulty, score bucket): the tag stage's difficulty, else the judge's rating."""
    prov = row["provenance"]
    score, rated = _judge_score(prov)
    bucket = "unscored" if score is None else f"score {round(score):g}"
    return prov["generation"]["method"], prov.get("difficulty") or rated or "unrated", bucket


def allocate(sizes: dict[Any, int], n: int) -> dict[Any, int]:
    """How many to take from each stratum: one each, the other n - len(sizes) in proportion to what each has
    left (largest remainders get the rounding). Never more than a stratum holds; all of it when n covers it."""
    total, strata = sum(sizes.values()), len(sizes)
    if n >= total:
        return dict(sizes)
    if n <= strata:
        return dict.fromkeys(sizes, 1)
    exact = {k: 1 + (n - strata) * (size - 1) / (total - strata) for k, size in sizes.items()}
    take = {k: int(q) for k, q in exact.items()}
    by_remainder = sorted(sizes, key=lambda k: (take[k] - exact[k], str(k)))
    for k in by_remainder[: n - sum(take.values())]:
        take[k] += 1
    return take


def _cell(value: Any) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if len(text) > MAX_CELL:
        text = f"{text[:MAX_CELL]} [... {len(text) - MAX_CELL:,} more characters not shown]"
    # A spreadsheet runs a cell starting with = + - @ as a formula, and adversarial samples carry attack text:
    # a leading quote keeps it text (import reads only sample_id, verdict, rating and notes).
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def export_review(src: str | Path, out: str | Path, n: int = 50, seed: int = 0, fields: list[str] | None = None) -> dict:
    """Write a stratified sample of the stage's kept samples to `out` (.csv or .html); returns what it wrote."""
    out = Path(out)
    kind = out.suffix.lower()
    if kind not in (".csv", ".html", ".htm"):
        raise BadInput(f"--out {out}: write a .csv or an .html file")
    if n < 1:
        raise BadInput(f"--n: must be >= 1, got {n}")
    stage = StageInput.open(src)
    columns = set(stage.schema.names)
    if fields is None:
        fields = [f for f in DEFAULT_FIELDS if f in columns]
    for f in fields:
        if f not in columns:
            raise BadInput(f"--reviewer-fields: {stage.path} has no column {f!r} (columns: {', '.join(sorted(columns))})")
        if f in FIXED_COLUMNS + VERDICT_COLUMNS:
            raise BadInput(f"--reviewer-fields: {f!r} is already a column of the review file")

    by_stratum: dict[tuple[str, str, str], list[str]] = {}
    for rows in stage.iter_rows():
        for row in rows:
            by_stratum.setdefault(stratum(row), []).append(row["sample_id"])
    if not by_stratum:
        raise BadInput(f"{stage.path}: no samples to review")
    rng = random.Random(seed)
    chosen: dict[str, int] = {}  # sample id -> position in the review file, stratum by stratum
    for key, k in sorted(allocate({key: len(ids) for key, ids in by_stratum.items()}, n).items()):
        for sid in sorted(rng.sample(sorted(by_stratum[key]), k)):
            chosen[sid] = len(chosen)

    records: list[dict[str, str] | None] = [None] * len(chosen)
    for rows in stage.iter_rows():
        for row in rows:
            if row["sample_id"] in chosen:
                method, difficulty, _ = stratum(row)
                score, _ = _judge_score(row["provenance"])
                records[chosen[row["sample_id"]]] = {
                    "sample_id": row["sample_id"],
                    "method": method,
                    "difficulty": difficulty,
                    "judge_score": "" if score is None else f"{score:g}",
                    **{f: _cell(row.get(f)) for f in fields},
                    "verdict": "",
                    "rating": "",
                    "notes": "",
                }
    header = [*FIXED_COLUMNS, *fields, *VERDICT_COLUMNS]
    _write_atomic(out, _csv_text(header, records) if kind == ".csv" else _html_page(stage.path, header, fields, records))
    return {"samples": len(records), "strata": len(by_stratum), "out": str(out)}


def _csv_text(header: list[str], records: list[dict[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header)
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Review {{ source }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }
section { border: 1px solid #ccc; border-radius: 6px; padding: 0.5rem 1rem; margin: 1rem 0; }
.meta { color: #555; font-size: 0.9em; }
pre { white-space: pre-wrap; background: #f6f6f6; padding: 0.5rem; }
textarea { width: 100%; min-height: 3em; }
#bar { position: sticky; top: 0; background: white; padding: 0.5rem 0; border-bottom: 1px solid #ccc; }
</style></head><body>
<div id="bar"><strong>{{ records | length }} samples from {{ source }}</strong>
<button id="download" type="button">Download verdicts (CSV)</button>
then run <code>synthforge review import FILE --reviewer NAME</code></div>
{% for r in records %}<section data-sample="{{ r.sample_id }}">
<p class="meta">{{ loop.index }}. <code>{{ r.sample_id }}</code> · method {{ r.method }} · difficulty {{ r.difficulty }}
· judge score {{ r.judge_score or "none" }}</p>
{% for f in fields %}<h4>{{ f }}</h4><pre>{{ r[f] }}</pre>
{% endfor %}<label><input type="radio" name="v{{ loop.index }}" value="pass"> pass</label>
<label><input type="radio" name="v{{ loop.index }}" value="fail"> fail</label>
<label>difficulty <select><option value=""></option><option>easy</option><option>medium</option>
<option>hard</option></select></label>
<textarea placeholder="notes (why it fails)"></textarea>
</section>
{% endfor %}<script type="application/json" id="samples">{{ data }}</script>
<script>
function cell(v) {
  v = v == null ? "" : String(v);
  return /[",\\r\\n]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v;
}
document.getElementById("download").addEventListener("click", function () {
  const data = JSON.parse(document.getElementById("samples").textContent);
  const lines = [data.header.map(cell).join(",")];
  for (const record of data.records) {
    const section = document.querySelector('section[data-sample="' + record.sample_id + '"]');
    const checked = section.querySelector("input[type=radio]:checked");
    record.verdict = checked ? checked.value : "";
    record.rating = section.querySelector("select").value;
    record.notes = section.querySelector("textarea").value;
    lines.push(data.header.map(function (c) { return cell(record[c]); }).join(","));
  }
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([lines.join("\\r\\n") + "\\r\\n"], {type: "text/csv"}));
  link.download = "review-verdicts.csv";
  link.click();
  URL.revokeObjectURL(link.href);
});
</script></body></html>
"""


def _html_page(source: Path, header: list[str], fields: list[str], records: list[dict[str, str]]) -> str:
    """One page with no external assets: the samples, pass/fail and notes per sample, a CSV download button."""
    from jinja2 import Environment
    from markupsafe import Markup

    # "</" would end the <script> element early if a sample contains it.
    data = json.dumps({"header": header, "records": records}, ensure_ascii=False).replace("</", "<\\/")
    return (
        Environment(autoescape=True)
        .from_string(_PAGE)
        .render(source=str(source), fields=fields, records=records, data=Markup(data))
    )


# -- import and the ledger ---------------------------------------------------------------------------------------


def read_ledger(path: str | Path) -> dict[str, dict[str, str]]:
    """sample id -> its latest review. A missing ledger means nobody has reviewed anything yet."""
    path = Path(path)
    if not path.exists():
        return {}
    entries: dict[str, dict[str, str]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInput(f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("sample_id", "reviewer")):
            raise BadInput(f"{path}:{lineno}: a review needs string sample_id and reviewer")
        if entry.get("verdict") not in ("pass", "fail"):
            raise BadInput(f"{path}:{lineno}: verdict must be pass or fail, got {entry.get('verdict')!r}")
        if entry.get("rating") not in (None, "", *RATINGS):
            raise BadInput(f"{path}:{lineno}: rating must be one of {', '.join(RATINGS)} or empty, got {entry['rating']!r}")
        entries.pop(entry["sample_id"], None)  # the later line is the later review
        entries[entry["sample_id"]] = {
            "sample_id": entry["sample_id"],
            "verdict": entry["verdict"],
            "notes": str(entry.get("notes") or ""),
            "rating": entry.get("rating") or "",
            "reviewer": entry["reviewer"],
            "reviewed_at": str(entry.get("reviewed_at") or ""),
        }
    return entries


def ledger_digest(path: str | Path) -> str:
    path = Path(path)
    return sha256_hex(path.read_bytes()) if path.exists() else "none"


def import_review(filled: str | Path, reviewer: str, ledger: str | Path = LEDGER, stage: str | Path | None = None) -> dict:
    """Validate a filled review file and merge its verdicts into the ledger; nothing is written if a row is bad.

    Rows are numbered as a spreadsheet shows them (the header is row 1)."""
    filled, ledger = Path(filled), Path(ledger)
    reviewer = reviewer.strip()
    if not reviewer:
        raise BadInput("--reviewer: give the reviewer's name")
    if not filled.is_file():
        raise BadInput(f"{filled}: file not found")
    known = _stage_ids(stage) if stage is not None else None
    with filled.open(encoding="utf-8-sig", newline="") as fh:  # utf-8-sig: spreadsheets save a byte order mark
        reader = csv.DictReader(fh)
        try:
            missing = [c for c in ("sample_id", "verdict") if c not in (reader.fieldnames or [])]
            if missing:
                raise BadInput(f"{filled}: row 1: missing column(s) {', '.join(missing)} (columns: {reader.fieldnames})")
            rows = list(reader)
        except UnicodeDecodeError as exc:
            raise BadInput(f"{filled}: not UTF-8 text (byte {exc.start}): save it as a UTF-8 CSV") from None
        except csv.Error as exc:
            raise BadInput(f"{filled}: row {reader.line_num}: not a readable CSV row: {exc}") from None

    errors, verdicts, first_row, blank = [], [], {}, 0
    for number, row in enumerate(rows, start=2):
        sid = (row.get("sample_id") or "").strip()
        verdict = (row.get("verdict") or "").strip().lower()
        rating = (row.get("rating") or "").strip().lower()
        if not sid:
            errors.append(f"{filled}: row {number}: empty sample_id")
            continue
        if sid in first_row:
            errors.append(f"{filled}: row {number}: duplicate sample_id {sid} (also row {first_row[sid]})")
            continue
        first_row[sid] = number
        if not SAMPLE_ID.fullmatch(sid):
            errors.append(f"{filled}: row {number}: {sid!r} is not a sample id (16 to 64 hex digits)")
        elif known is not None and sid not in known:
            errors.append(f"{filled}: row {number}: unknown sample_id {sid} (not in {stage})")
        if verdict not in ("pass", "fail", ""):
            errors.append(f"{filled}: row {number}: verdict must be pass, fail or blank, got {row['verdict']!r}")
        elif rating not in ("", *RATINGS):
            errors.append(f"{filled}: row {number}: rating must be {', '.join(RATINGS)} or blank, got {row['rating']!r}")
        elif not verdict:
            blank += 1
        else:
            verdicts.append((sid, verdict, rating, (row.get("notes") or "").strip()))
    if errors:
        shown = errors[:20] + ([f"... and {len(errors) - 20} more"] if len(errors) > 20 else [])
        raise BadInput(f"{len(errors)} invalid row(s), nothing recorded:\n" + "\n".join(shown))

    entries = read_ledger(ledger)
    replaced = sum(sid in entries for sid, *_ in verdicts)
    reviewed_at = now_iso()
    for sid, verdict, rating, notes in verdicts:
        entries.pop(sid, None)
        entry = {"sample_id": sid, "verdict": verdict, "rating": rating, "notes": notes, "reviewer": reviewer}
        entries[sid] = {**entry, "reviewed_at": reviewed_at}
    _write_atomic(ledger, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries.values()))
    return {
        "recorded": len(verdicts),
        "pass": sum(v == "pass" for _, v, *_ in verdicts),
        "fail": sum(v == "fail" for _, v, *_ in verdicts),
        "blank": blank,
        "replaced": replaced,
        "ledger": str(ledger),
    }


def _stage_ids(stage: str | Path) -> set[str]:
    source = StageInput.open(stage)
    return set(read_manifest(source.path / "manifest.parquet", columns=["sample_id"]).column("sample_id").to_pylist())


# -- the judge check ---------------------------------------------------------------------------------------------


@dataclass
class ReviewOptions:
    ledger: str = LEDGER


class ReviewCheck:
    """A reviewer's verdict from the ledger; samples nobody reviewed are not judged by this check."""

    name = "review"
    Options = ReviewOptions

    def __init__(self, options: ReviewOptions, where: str, params_file: str):
        self.ledger = Path(options.ledger)
        self.digest = ledger_digest(self.ledger)
        self.entries = read_ledger(self.ledger)

    def check(self, row: Row) -> dict | None:
        from synthforge.stages.judge import result  # judge.py imports this module to register the check

        entry = self.entries.get(row["sample_id"])
        if entry is None:
            return None
        ok = entry["verdict"] == "pass"
        reason = entry["notes"] or (None if ok else f"failed manual review by {entry['reviewer']}")
        return result(self.name, ok, reason, judged_by=entry["reviewer"], difficulty=entry["rating"] or None)
