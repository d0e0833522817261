"""The landing zone: an inbox for a user's files, and the append-only log of what arrived.

A file dropped into the inbox is *admitted* once, by content: read whole and checked against the
dataset spec, then copied into the log (`<inbox>/_landed/`) or, if it cannot be used, into
`<inbox>/_quarantine/`, each beside a note (`.json`) of what it held or why it was refused.
Ingest reads the log, never the inbox. So a day is rebuilt from everything that ever arrived for
it: moving or deleting an inbox file once it was admitted changes nothing; the same bytes dropped
again are the same arrival; a rewritten file is a new arrival whose repeated event ids are
rejected as duplicates (the first copy stays: a landed event is corrected by a new event, not by
rewriting the old one).

One unreadable file never stops the others: it is quarantined with its reason, and every other
file goes on. Admission runs under a lock, so the sensor and a run admitting at once agree.

Reference tables (`eventml.references`) have a folder each, `<inbox>/references/<name>/`: small
tables that are read whole on every run (`read_reference_files`), oldest file name first, so a
later file's row for the same key and time corrects an earlier one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import polars as pl

from eventml.home import interprocess_lock
from eventml.schema import ISO_UTC, REQUIRED_COLUMNS, DatasetSpec, Reference
from eventml.validation import map_columns, parse_ts

LANDING_SUFFIXES = (".parquet", ".csv")
LANDED, QUARANTINE = "_landed", "_quarantine"
REFERENCES = "references"  # <inbox>/references/<name>/: a reference table's files
CHUNK = 1 << 20


class LandingFileError(ValueError):
    """A file that cannot be ingested as a whole; the message says why and what to do."""


@dataclass(frozen=True)
class Arrival:
    """One admitted file: where its copy is, and what it held (or why it was refused)."""

    name: str  # as dropped in the inbox
    sha256: str
    status: str  # "landed" or "quarantined"
    arrived_at: str  # ISO 8601, UTC
    rows: int | None = None
    days: tuple[str, ...] = ()  # the partition days its rows are placed on
    reason: str | None = None

    @property
    def source(self) -> str:
        """The name its rows carry in `source`: unique per arrival, and the log file's name."""
        return f"{self.sha256[:12]}-{self.name}"


def landing_files(folder: str | Path) -> list[Path]:
    """Data files in the inbox, oldest name first. Names starting with '.' or '_' are files
    still being written (the usual convention for an atomic drop), so they wait."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in LANDING_SUFFIXES and p.name[0] not in "._"
    )


def read_landing_file(path: Path, spec: DatasetSpec, source: str | None = None) -> pl.DataFrame:
    """One file's rows in canonical columns, all as text, so a value that will not parse is still
    kept verbatim for the rejects table; typed timestamps are rendered as ISO 8601 in UTC.
    Raises `LandingFileError` for a file that cannot be read as the spec describes."""
    frame = _read(path)
    # A column the pack gives a constant for (every row a `payment`) need not be in the file.
    expected = {c: spec.columns.get(c, c) for c in REQUIRED_COLUMNS if c not in spec.constants}
    if missing := [c for c, name in expected.items() if name not in frame.columns]:
        raise LandingFileError(
            f"{path.name}: its columns do not match dataset spec {spec.name!r}: expected "
            f"{[expected[c] for c in missing]} (for {missing}), found {frame.columns[:20]}. "
            "Map the file's names under `columns:` in the pack (or give a `constants:` value), "
            "or export the file with them"
            " (a comma-separated CSV with a header row)"
        )
    mapped = map_columns(frame, spec)
    if nested := [c for c, t in mapped.schema.items() if t.is_nested()]:
        raise LandingFileError(
            f"{path.name}: columns {nested} are nested ({[str(mapped.schema[c]) for c in nested]}); "
            "flatten them into one plain value per row"
        )
    ts_type = mapped.schema["ts"]
    if isinstance(ts_type, pl.Datetime | pl.Date):
        mapped = mapped.with_columns(
            parse_ts(pl.col("ts"), ts_type, spec).dt.strftime(ISO_UTC).alias("ts")
        )
    return mapped.with_columns(
        pl.all().cast(pl.String), pl.lit(source or path.name).alias("source")
    )


def _read(path: Path) -> pl.DataFrame:
    if path.stat().st_size == 0:
        raise LandingFileError(f"{path.name}: the file is empty (0 bytes)")
    try:
        if path.suffix.lower() == ".csv":
            return pl.read_csv(path, infer_schema=False)
        return pl.read_parquet(path)
    except pl.exceptions.NoDataError:
        raise LandingFileError(f"{path.name}: the CSV has no header and no rows") from None
    except pl.exceptions.ComputeError as error:
        if "utf-8" in str(error).lower():
            raise LandingFileError(
                f"{path.name}: not UTF-8 text; re-export it as UTF-8 ({_first_line(error)})"
            ) from None
        raise LandingFileError(f"{path.name}: cannot be read ({_first_line(error)})") from None
    except (OSError, pl.exceptions.PolarsError) as error:
        raise LandingFileError(f"{path.name}: cannot be read ({_first_line(error)})") from None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__


def placeable_days(rows: pl.DataFrame, spec: DatasetSpec, days: tuple[date, date]) -> list[date]:
    """The days in [first, end) that rows' timestamps fall on: where the rows will be placed."""
    first, end = days
    found = rows.select(parse_ts(pl.col("ts"), pl.String(), spec).dt.date().alias("d"))["d"]
    return sorted({d for d in found.drop_nulls().unique() if first <= d < end})


def admit(inbox: str | Path, spec: DatasetSpec, days: tuple[date, date]) -> list[Arrival]:
    """Admit every inbox file not admitted before (by content); returns the new arrivals.

    `days` is [first, end) of the partitions: a file none of whose rows falls inside them has
    nowhere to be placed, so it is quarantined rather than lost."""
    inbox = Path(inbox)
    new = []
    with interprocess_lock(inbox / f"{LANDED}.lock"):
        known = {a.sha256 for a in arrivals(inbox, include_quarantined=True)}
        for path in landing_files(inbox):
            digest = _sha256(path)
            if digest in known:
                continue
            known.add(digest)
            new.append(_admit_one(path, digest, spec, days))
    return new


def _admit_one(path: Path, digest: str, spec: DatasetSpec, days: tuple[date, date]) -> Arrival:
    arrived = datetime.now(UTC).isoformat()
    try:
        rows = read_landing_file(path, spec)
        placed = placeable_days(rows, spec, days)
        if not placed:
            raise LandingFileError(
                f"{path.name}: none of its {rows.height:,} rows has a timestamp inside the "
                f"partitions {days[0]}..{days[1]} (exclusive); fix the timestamps or the range"
            )
        arrival = Arrival(path.name, digest, "landed", arrived, rows.height,
                          tuple(d.isoformat() for d in placed))  # fmt: skip
    except LandingFileError as error:
        arrival = Arrival(path.name, digest, "quarantined", arrived, reason=str(error))
    folder = path.parent / (LANDED if arrival.status == "landed" else QUARANTINE)
    folder.mkdir(exist_ok=True)
    copy = folder / arrival.source
    _atomic(copy, lambda tmp: shutil.copyfile(path, tmp))
    # The note is written last: an arrival exists once its note does (a copy alone is retried).
    _atomic(copy.with_name(copy.name + ".json"),
            lambda tmp: tmp.write_text(json.dumps(asdict(arrival), indent=1)))  # fmt: skip
    return arrival


def _atomic(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    write(tmp)
    os.replace(tmp, target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def arrivals(inbox: str | Path, include_quarantined: bool = True) -> list[Arrival]:
    """Every admitted file, in order of arrival."""
    inbox = Path(inbox)
    folders = [LANDED, QUARANTINE] if include_quarantined else [LANDED]
    notes = [p for f in folders for p in sorted((inbox / f).glob("*.json"))]
    found = []
    for note in notes:
        data = json.loads(note.read_text())
        found.append(Arrival(**{**data, "days": tuple(data.get("days", ()))}))
    return sorted(found, key=lambda a: (a.arrived_at, a.source))


def read_landed(inbox: str | Path, spec: DatasetSpec) -> pl.DataFrame:
    """Every row that ever landed, as text, each with its arrival's `source`."""
    inbox = Path(inbox)
    frames = [
        read_landing_file(inbox / LANDED / a.source, spec, source=a.source)
        for a in arrivals(inbox, include_quarantined=False)
    ]
    if not frames:
        return pl.DataFrame(schema={c: pl.String for c in [*spec.event_schema(), "source"]})
    # A file that predates a column the pack added holds it as null.
    return pl.concat(frames, how="diagonal")


def reference_folder(inbox: str | Path, ref: Reference) -> Path:
    return Path(inbox) / REFERENCES / ref.name


def read_reference_files(
    inbox: str | Path, ref: Reference, spec: DatasetSpec
) -> tuple[pl.DataFrame, dict[str, str]]:
    """Every row of the reference table's files, oldest name first, as text with its file's name
    in `source`; and each file that cannot be read, with why (the others are still read)."""
    frames, unreadable = [], {}
    for path in landing_files(reference_folder(inbox, ref)):
        try:
            frame = _read(path)
        except LandingFileError as error:
            unreadable[path.name] = str(error)
            continue
        typed = [c for c, t in frame.schema.items() if isinstance(t, pl.Datetime | pl.Date)]
        frames.append(
            frame.with_columns(
                *[parse_ts(pl.col(c), frame.schema[c], spec).dt.strftime(ISO_UTC) for c in typed]
            ).with_columns(pl.all().cast(pl.String), pl.lit(path.name).alias("source"))
        )
    rows = (
        pl.concat(frames, how="diagonal") if frames else pl.DataFrame(schema={"source": pl.String})
    )
    return rows, unreadable


def reference_files_digest(inbox: str | Path, spec: DatasetSpec) -> str:
    """One hash of every reference table's files (names and contents): it changes when a file
    is added, replaced or removed."""
    digest = hashlib.sha256()
    for ref in spec.references:
        for path in landing_files(reference_folder(inbox, ref)):
            digest.update(f"{ref.name}/{path.name}:{_sha256(path)}\n".encode())
    return digest.hexdigest()


def manifest(inbox: str | Path) -> pl.DataFrame:
    """The arrivals as a table (what the `landing_files` side table holds)."""
    rows = [{**asdict(a), "days": len(a.days), "first_day": min(a.days, default=None),
             "last_day": max(a.days, default=None), "source": a.source}
            for a in arrivals(inbox)]  # fmt: skip
    schema = {"name": pl.String, "sha256": pl.String, "status": pl.String, "arrived_at": pl.String,
              "rows": pl.Int64, "days": pl.Int64, "reason": pl.String, "first_day": pl.String,
              "last_day": pl.String, "source": pl.String}  # fmt: skip
    return pl.DataFrame(rows, schema=schema)
