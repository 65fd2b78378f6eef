"""Results: one row per (case, compared output, backend), written as the sweep goes.

A sweep directory holds `results.jsonl` (appended and flushed row by row, so a crash or a kill
loses at most the case in flight), `meta.json` (the environment fingerprint of each run that
wrote to it) and, once the sweep ends, `results.parquet` (the same rows, metrics flattened to
columns for pandas). Every file other than the JSONL is replaced atomically (temp file + rename),
so a kill never leaves half of one; a damaged `meta.json` is reported in one line and rebuilt from
the rows. A run holds `DIR/.lock` (an flock: released by the kernel when its process dies) so two
runs never write one directory at once. Resuming reads the last final row of each (case, backend)
pair (`finished`); `--fresh` drops only the rows of the pairs it reruns (`drop_pairs`).
`merge` joins the results of shards (or machines) into one directory, last row wins per key.
Rows are `harness.records.Row`s: written by `Row.to_json` (NaN / Infinity as JSON number tokens),
read by `Row.from_json` (a malformed line: RecordError naming file, line and field; files of
the schema before, with "nan" strings, still load). Nothing here runs a kernel: the report and
`compare` read these files only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from harness.records import Outcome, Panel, Row, jsonable

JSONL = "results.jsonl"
PARQUET = "results.parquet"
META = "meta.json"
LOCK = ".lock"


def row_line(row: Row) -> str:
    """One results line: the row's JSON (NaN / Infinity as JSON number tokens), sorted keys."""
    return json.dumps(row.to_json(), sort_keys=True) + "\n"


def atomic_write(path: str | Path, text: str) -> None:
    """Replace `path` with `text` all at once: readers see the old file or the new, never half."""
    with _replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def _replacing(path: str | Path) -> Iterator[Path]:
    """A temp path beside `path`; on success it is synced and renamed over `path`."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are shared like any output
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class DirectoryBusy(RuntimeError):
    """Another process holds a results directory's lock; the message says who."""


@contextlib.contextmanager
def locked(out_dir: str | Path, command: str = "") -> Iterator[None]:
    """Hold `out_dir`'s lock for a writing run, or raise DirectoryBusy naming its holder."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    f = open(d / LOCK, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                h = json.loads(f.read())
                who = f"pid {h['pid']} on {h['host']} since {h['since']} ({h['command']})"
            except (json.JSONDecodeError, KeyError, TypeError):
                who = "another process"
            raise DirectoryBusy(
                f"{d} is in use by {who}; wait for it to end or write elsewhere with -o"
            ) from None
        f.truncate(0)
        holder = {
            "pid": os.getpid(),
            "host": platform.node(),
            "command": command or "?",
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        f.write(json.dumps(holder))
        f.flush()
        yield
    finally:
        f.close()  # closing releases the flock


class ResultWriter:
    """Appends rows to `results.jsonl`, each flushed and synced before the next case runs."""

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / JSONL
        torn = False
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as f:  # a kill mid-write leaves a line without its "\n"
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        self._f = open(self.path, "a", encoding="utf-8")
        if torn:
            self._f.write("\n")  # keep the torn line apart: it is skipped, the next row is not

    def write(self, rows: Iterable[Row]) -> None:
        # One write per case: with O_APPEND, processes sharing the file (pytest-xdist workers
        # with --harness-results) never interleave inside a case's rows.
        self._f.write("".join(row_line(r) for r in rows))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_rows(path: str | Path) -> list[Row]:
    """Rows of a results directory or file (.jsonl or .parquet); a torn line is ignored, a
    line that is JSON but not a row raises RecordError naming file, line and field. Rows of
    earlier harness versions (schema 1: NaN written as "nan") load as they were meant."""
    p = Path(path)
    if p.is_dir():
        p = p / JSONL if (p / JSONL).exists() else p / PARQUET
    if not p.exists():
        raise FileNotFoundError(f"{path}: no {JSONL} or {PARQUET} here")
    if p.suffix == ".parquet":
        df = pd.read_parquet(p)
        return [_from_frame(r, f"{p}:row {i + 1}") for i, r in enumerate(df.to_dict("records"))]
    rows = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write: that case reruns on resume
            rows.append(Row.from_json(d, f"{p}:{n}"))
    return rows


def _from_frame(r: dict[str, Any], where: str) -> Row:
    """A row of `to_frame`'s table: metrics from their JSON column; the flattened `m.*` columns
    and the empty cells of columns other rows have are dropped."""
    d = {
        k: v
        for k, v in r.items()
        if not k.startswith("m.") and v is not None and not (isinstance(v, float) and v != v)
    }
    if isinstance(d.get("metrics"), str):
        d["metrics"] = json.loads(d["metrics"])
    for k in ("schema", "threads"):
        if isinstance(d.get(k), float):
            d[k] = int(d[k])
    return Row.from_json(d, where)


def finished(out_dir: str | Path) -> dict[tuple[str, str], Row]:
    """The last final row of each (case_id, backend) pair in this directory (what resume sees)."""
    p = Path(out_dir) / JSONL
    if not p.exists():
        return {}
    return {r.pair: r for r in read_rows(p) if r.final}


def timed_pairs(out_dir: str | Path) -> set[tuple[str, str]]:
    """(case_id, backend) pairs with a timing row in this directory: done for a timed sweep."""
    p = Path(out_dir) / JSONL
    if not p.exists():
        return set()
    return {r.pair for r in read_rows(p) if r.compare == TIMING}


def drop_pairs(out_dir: str | Path, pairs: set[tuple[str, str]]) -> tuple[int, int]:
    """Rewrite `results.jsonl` without the rows of `pairs`, atomically (torn lines go too).
    Returns (rows dropped, rows kept): rows of every other pair stay as they were."""
    p = Path(out_dir) / JSONL
    if not p.exists():
        return 0, 0
    kept, dropped = [], 0
    with open(p, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (r.get("case_id"), r.get("backend")) in pairs:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write(p, "".join(kept))
    return dropped, len(kept)


def latest(rows: list[Row]) -> list[Row]:
    """Keep the last row per (case, backend, compared output): resumed and merged runs."""
    seen: dict[tuple[str, str, str], Row] = {}
    for r in rows:
        seen[r.key] = r
    return list(seen.values())


def to_frame(rows: list[Row]) -> pd.DataFrame:
    """Rows as a DataFrame: scalar metrics flattened to `m.<name>`, the rest kept as JSON."""
    flat = []
    for r in rows:
        d = r.to_json()
        m = d["metrics"]
        d["metrics"] = json.dumps(m, sort_keys=True)
        for k, v in m.items():
            if isinstance(v, (int, float, str, bool)) or v is None:
                d[f"m.{k}"] = v
        flat.append(d)
    df = pd.DataFrame(flat)
    for col in df.columns:  # mixed object columns break parquet; keep them as strings
        if df[col].dtype == object and df[col].map(type).nunique() > 1:
            df[col] = df[col].map(lambda v: None if v is None else str(v))
    return df


def write_parquet(out_dir: str | Path) -> Path:
    out = Path(out_dir) / PARQUET
    with _replacing(out) as tmp:
        to_frame(latest(read_rows(Path(out_dir) / JSONL))).to_parquet(tmp, index=False)
    return out


def _command(args: list[str], cwd: Path | None = None) -> str | None:
    """First line of a command's output, or None where it fails or is missing."""
    try:
        p = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    out = p.stdout.strip().splitlines()
    return out[0] if p.returncode == 0 and out else None  # `git` prints its args on failure


def _git_sha() -> str | None:
    return _command(["git", "rev-parse", "HEAD"], Path(__file__).resolve().parent)


def _git_dirty() -> bool | None:
    """Whether the checkout the harness runs from has uncommitted changes to tracked files (a
    result from a dirty tree is not reproducible from its sha); None outside a git checkout."""
    here = Path(__file__).resolve().parent
    if _git_sha() is None:
        return None
    try:
        p = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(p.stdout.strip()) if p.returncode == 0 else None


def fingerprint() -> dict[str, Any]:
    """Where and with what a result was produced (GPU, driver, CUDA, packages, git sha and
    whether the tree was dirty)."""
    import torch

    env: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "git_sha": _git_sha(),
        "git_dirty": _git_dirty(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(
            gpu=p.name,
            capability=f"sm_{p.major}{p.minor}",
            gpu_count=torch.cuda.device_count(),
            driver=_command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        )
    for pkg in ("triton", "nvidia-cutlass-dsl", "numpy", "pandas"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = None
    return env


def append_meta(out_dir: str | Path, info: dict[str, Any]) -> None:
    """Add one run to `meta.json` (atomically); a damaged file is kept as `meta.json.damaged`."""
    p = Path(out_dir) / META
    runs, damaged = _meta_runs(Path(out_dir))
    if damaged:
        shutil.copyfile(p, p.with_name(META + ".damaged"))
    atomic_write(p, json.dumps({"runs": [*runs, jsonable(info)]}, indent=1, sort_keys=True))


def read_meta(out_dir: str | Path) -> dict[str, Any]:
    """The runs recorded in `meta.json`; damaged, it is reported once and rebuilt from the rows."""
    return {"runs": _meta_runs(Path(out_dir))[0]}


_reported: set[Path] = set()


def _meta_runs(d: Path) -> tuple[list[dict[str, Any]], bool]:
    """(runs, damaged). Damaged: one line on stderr, runs rebuilt from the rows' run ids (their
    environments are lost; the results are not)."""
    p = d / META
    if not p.exists():
        return [], False
    try:
        runs = json.loads(p.read_text(encoding="utf-8"))["runs"]
        if isinstance(runs, list):
            return runs, False
        problem = f"'runs' is a {type(runs).__name__}, not a list"
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        problem = f"{type(e).__name__}: {e}"
    rows = read_rows(d / JSONL) if (d / JSONL).exists() else []
    order = dict.fromkeys(r.run_id for r in rows)
    runs = [
        {
            "run_id": rid,
            "recovered": True,
            "pairs": sum(r.run_id == rid and r.final for r in rows),
        }
        for rid in order
    ]
    if p.resolve() not in _reported:
        _reported.add(p.resolve())
        print(
            f"warning: {p} is damaged ({problem}); rebuilt {len(runs)} runs from {JSONL} "
            f"(their environments are lost, no result is)",
            file=sys.stderr,
        )
    return runs, True


def merge(sources: list[str | Path], out_dir: str | Path) -> int:
    """Join the results of several sweep directories (shards) into `out_dir`. Returns rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    runs: list[dict[str, Any]] = []
    for s in sources:
        rows.extend(read_rows(s))
        runs.extend(read_meta(s)["runs"] if Path(s).is_dir() else [])
    rows = latest(rows)
    with locked(out, "merge"):
        atomic_write(out / JSONL, "".join(row_line(r) for r in rows))
        atomic_write(out / META, json.dumps({"runs": runs}, indent=1, sort_keys=True))
        write_parquet(out)
    return len(rows)


def compare_sets(base: list[Row], new: list[Row]) -> dict[str, list]:
    """Per (case, backend) final outcome: regressions, improvements, new failures, gone."""
    b = {r.pair: r for r in latest(base) if r.final}
    n = {r.pair: r for r in latest(new) if r.final}
    out: dict[str, list] = {
        "regressions": [],
        "improvements": [],
        "new_failures": [],
        "new_cases": [],
        "missing": [],
        "unchanged": [],
    }
    for k, r in n.items():
        if k not in b:
            out["new_failures" if r.outcome.bad else "new_cases"].append((k, None, r))
            continue
        was, now = b[k].outcome, r.outcome
        if was is Outcome.PASS and now.bad:
            out["regressions"].append((k, b[k], r))
        elif was.bad and now is Outcome.PASS:
            out["improvements"].append((k, b[k], r))
        else:
            out["unchanged"].append((k, b[k], r))
    out["missing"] = [(k, r, None) for k, r in b.items() if k not in n]
    return out


TIMING = "timing"  # `compare` value of rows holding a speed measurement (docs/cli.md)


def compare_timings(
    base: list[Row], new: list[Row], same_within: float | None = None
) -> dict[str, list]:
    """Per (case, backend) timed in both sets: faster / slower / same / ambiguous.

    From the kept samples, a bootstrap of the median ratio new/base (harness.timing
    `compare_samples`); rows without samples fall back to their p10..p90 intervals. Each item is
    (key, base row, new row, {"verdict", "ratio", "ratio_lo", "ratio_hi"}).
    """
    from harness import timing

    tol = timing.SAME_WITHIN if same_within is None else same_within

    def timings(rows: list[Row]) -> dict[tuple[str, str], Row]:
        return {
            r.pair: r for r in latest(rows) if r.compare == TIMING and "latency_us" in r.metrics
        }

    def interval(m: Panel) -> tuple[float, float, float]:
        med = m["latency_us"]
        return med, m.get("latency_p10_us", med), m.get("latency_p90_us", med)

    b, n = timings(base), timings(new)
    out: dict[str, list] = {v.value: [] for v in timing.Verdict}
    for k in sorted(set(b) & set(n)):
        mb, mn = b[k].metrics, n[k].metrics
        if mb.get("samples_us") and mn.get("samples_us"):
            v = timing.compare_samples(mb["samples_us"], mn["samples_us"], tol)
        else:
            v = timing.compare_intervals(interval(mb), interval(mn), tol)
        out[v["verdict"]].append((k, b[k], n[k], v))
    return out
