"""`loupe search`: the command's body, and a way in that does not import typer.

Building the typer app (typer, its vendored click, pydantic for its parameter adapters) cost a
cold search 0.43 s of imports at load ~10 (benchmarks/RESULTS.md) before any work began. `run_fast` reads the argument lists a search is
usually given (known options, well-formed values) the way typer's parser reads them, and runs the
same body (`run_search`); anything else (`--help`, an unknown or malformed option, a value typer
would convert or refuse in its own way, a non-UTF-8 terminal) returns None and the caller hands
the whole command line to typer, so its options and errors behave exactly as before. The option
table below is checked against typer's command in tests/test_cold_search.py.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

# parameter -> (kind, default, names on the command line); kinds: flag, int (>= 1), float, str, path, strs (repeatable)
PARAMETERS = {
    "k": ("int", 10, ("-k", "--top")),
    "captions": ("flag", False, ("--captions",)),
    "min_score": ("float", None, ("--min-score",)),
    "folder": ("path", None, ("--in",)),
    "glob": ("strs", None, ("--glob",)),
    "after": ("str", None, ("--after",)),
    "before": ("str", None, ("--before",)),
    "date_field": ("str", "auto", ("--date-field",)),
    "as_json": ("flag", False, ("--json",)),
    "model": ("str", None, ("--model", "-m")),
    "pretrained": ("str", None, ("--pretrained",)),
    "checkpoint": ("path", None, ("--checkpoint", "-c")),
    "device": ("str", "auto", ("--device",)),
    "text_precision": ("str", "auto", ("--text-precision",)),
    "nprobe": ("int", None, ("--nprobe",)),
    "ef_search": ("int", None, ("--ef-search",)),
    "search_params": ("str", None, ("--search-params",)),
    "home": ("path", None, ("--home",)),
    "db": ("str", None, ("--db",)),
    "timings": ("flag", False, ("--timings",)),
}
OPTIONS = {name: (param, kind) for param, (kind, _, names) in PARAMETERS.items() for name in names}  # name -> (parameter, kind)
DEFAULTS = {param: default for param, (_, default, _) in PARAMETERS.items()}
ENVVARS = {"home": ("LOUPE_HOME", Path), "db": ("LOUPE_DB", str)}
_INT = re.compile(r"[0-9]+")
_FLOAT = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
HEAVY = ("torch", "open_clip", "sqlalchemy", "faiss", "typer")  # what `--timings` reports a search imported
_ANSI = re.compile(r"\033\[[;?0-9]*[a-zA-Z]")  # what click strips from output that is not a terminal


def parse_search_args(args: Sequence[str]) -> dict | None:
    """The parameters typer would pass to `search` for `args` (after the word `search`), or None
    when typer must read them itself (help, unknown or malformed options, values it might refuse)."""
    values = dict(DEFAULTS)
    given: set[str] = set()
    query: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            query += args[i:]
            break
        if not arg.startswith("-") or arg == "-":
            query.append(arg)
            continue
        name, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name not in OPTIONS:
            return None
        param, kind = OPTIONS[name]
        if kind == "flag":
            if eq:
                return None
            values[param] = True
            continue
        if eq:
            raw = inline
        elif i < len(args):
            raw = args[i]
            i += 1
        else:
            return None
        value = _convert(raw, kind)
        if value is None:
            return None
        if kind == "strs":
            values[param] = [*(values[param] or []), value]
        else:
            values[param] = value
        given.add(param)
    if not query:
        return None
    values["query"] = query
    for param, kind in OPTIONS.values():
        if kind == "strs" and values[param] is None:
            values[param] = []  # typer's value of a repeatable option not given
    for param, (var, kind) in ENVVARS.items():
        if param not in given and var in os.environ:
            if not os.environ[var]:
                return None  # let typer decide what an empty variable means
            values[param] = kind(os.environ[var])
    return values


def _convert(raw: str, kind: str):
    """A value as typer converts it, or None where typer might read it otherwise (or refuse it)."""
    if not raw:
        return None
    if kind == "int":
        return int(raw) if _INT.fullmatch(raw) and int(raw) >= 1 else None
    if kind == "float":
        return float(raw) if _FLOAT.fullmatch(raw) else None
    if kind == "path":
        return Path(raw)
    return raw


def echo(message: str, err: bool = False) -> None:
    """What `typer.echo` does on a UTF-8 stream: one line, ANSI codes stripped off a terminal, flushed."""
    stream = sys.stderr if err else sys.stdout
    out = f"{message}\n"
    try:
        tty = stream.isatty()
    except Exception:
        tty = False
    if not tty:
        out = _ANSI.sub("", out)
    stream.write(out)
    stream.flush()


def _plain_streams() -> bool:
    """Whether `echo` writes exactly as click would: UTF-8 text streams, not Windows."""
    def utf8(stream) -> bool:
        return (getattr(stream, "encoding", None) or "").lower().replace("_", "-") in ("utf-8", "utf8")

    return sys.platform != "win32" and utf8(sys.stdout) and utf8(sys.stderr)


def run_fast(args: Sequence[str]) -> int | None:
    """Run `loupe search ARGS` without typer; the exit code, or None: hand the command line to typer."""
    if not _plain_streams():
        return None
    values = parse_search_args(args)
    if values is None:
        return None
    from loupe.indexer.errors import LoupeError

    try:
        _start_tower(values)
        run_search(echo=echo, **values)
    except LoupeError as exc:
        echo(f"loupe: error: {exc}", err=True)
        return 1
    return 0


def _start_tower(values: dict) -> None:
    """Begin loading the index's cached text tower first thing (`loupe.indexer.models.factory.prestart`).

    The ONNX Runtime session is the longest single step of a cold search, and the only large one
    that runs outside the GIL: started before the rest of the search is even imported, it loads
    on the second core while the catalog is read. Only a guess, made when no `loupe serve` may
    answer; `run_search` checks everything again, and a query that fails here fails there.
    """
    from loupe.indexer.errors import LoupeError
    from loupe.indexer.models.factory import prestart
    from loupe.indexer.storage.locations import resolve_location
    from loupe.retrieval.engine.query import parse_query
    from loupe.retrieval.web.client import state_file

    try:
        terms = parse_query(values["query"])
    except LoupeError:
        return
    location = resolve_location(values["home"], values["db"])
    if state_file(location).exists():
        return
    prestart(location, [t.value for t in terms if t.kind == "text"], values["text_precision"], values["device"])


def run_search(
    query: list[str], k: int, captions: bool, min_score: float | None, folder: Path | None, glob: list[str] | None,
    after: str | None, before: str | None, date_field: str, as_json: bool, model: str | None, pretrained: str | None,
    checkpoint: Path | None, device: str, text_precision: str, nprobe: int | None, ef_search: int | None,
    search_params: str | None, home: Path | None, db: str | None, timings: bool, echo: Callable[..., None] = echo,
) -> None:
    """The body of `loupe search` (see its help in cli/commands_core.py); `echo` prints a line."""
    started = time.perf_counter()
    from loupe.indexer.storage.vectors import join_search_params, parse_search_params
    from loupe.retrieval.engine.query import parse_query
    from loupe.retrieval.web.client import search_via_server

    params = join_search_params(search_params, nprobe, ef_search)
    parse_search_params(params)  # a bad string fails before any work
    terms = parse_query(query)
    target = "text" if captions else "image"
    # a running `loupe serve` keeps the search parameters it was started with: with others, search here
    hits = None if params else search_via_server(
        home, db, terms, target, k, min_score, folder, glob, after, before, date_field, model, pretrained, checkpoint, device,
        text_precision,
    )
    searcher = None
    if hits is None:  # no `loupe serve` running for this index and model: search in this process
        texts = [t.value for t in terms if t.kind == "text"]
        from loupe.indexer.models.factory import prestart
        from loupe.indexer.storage.locations import resolve_location

        prestart(resolve_location(home, db), texts, text_precision, device)  # the text tower loads while the catalog opens
        from loupe.retrieval.engine.search import Filters, open_searcher

        filters = Filters.parse(folder, glob, after, before, date_field)
        searcher = open_searcher(
            home, db, model, pretrained, checkpoint, device, preload=(target,), text_precision=text_precision,
            search_params=params, texts=texts,
        )
        hits = searcher.search(terms, target=target, k=k, filters=filters, min_score=min_score)
    if as_json:
        for hit in hits:
            echo(json.dumps(hit.to_json(), ensure_ascii=False))
    elif not hits:
        echo("no results", err=True)
    else:
        print_table(hits, captions, echo)
    report = {"seconds": round(time.perf_counter() - started, 4), "server": searcher is None}
    if searcher is not None:
        from loupe.indexer.models.text_tower import OnnxTextTower

        spec = searcher.encoder.spec
        report.update(searcher.stats, text_encoder=spec.text_backend, text_precision=spec.text_precision,
                      onnx_sessions=OnnxTextTower.sessions_created, heavy_imports=[m for m in HEAVY if m in sys.modules])
        sys.stdout.flush()  # the results are out; caching the text tower for the next search may take seconds
        from loupe.indexer.models.factory import cache_text_tower

        report["text_tower"] = cache_text_tower(searcher.encoder, searcher.store.location, searcher.meta)
    if timings:
        echo(json.dumps(report), err=True)


def _clock(seconds: float) -> str:
    """m:ss.s (h:mm:ss.s past an hour)."""
    m, s = divmod(max(0.0, float(seconds)), 60)
    h, m = divmod(int(m), 60)
    return f"{h}:{m:02d}:{s:04.1f}" if h else f"{m}:{s:04.1f}"


def print_table(hits, captions: bool, echo: Callable[..., None] = echo) -> None:
    rows = []
    for h in hits:
        f = h.fields
        if captions:
            where = f" [{f['image']}]" if f.get("image") else ""
            rows.append((str(h.rank), f"{h.score:.4f}", f"{f['text']}{where}"))
        else:
            dup = f"  (+{len(f['duplicates'])} identical)" if f["duplicates"] else ""
            if f.get("time") is not None:  # a video moment: where to look, and the scene around it
                more = f", +{len(f['moments'])} more moments" if f.get("moments") else ""
                dup = f"  at {_clock(f['time'])} (scene {_clock(f['start'])}-{_clock(f['end'])}{more}){dup}"
            
            matched = f.get("text_match")
            said = f"  text: {' / '.join(line['text'] for line in matched['lines'][:2])!r}" if matched else ""
            rows.append((str(h.rank), f"{h.score:.4f}", f"{f['path']}{dup}{said}"))
    header = ("rank", "score", "caption" if captions else "path")
    w0 = max(len(header[0]), *(len(r[0]) for r in rows))
    w1 = max(len(header[1]), *(len(r[1]) for r in rows))
    echo(f"{header[0]:>{w0}}  {header[1]:>{w1}}  {header[2]}")
    for r in rows:
        echo(f"{r[0]:>{w0}}  {r[1]:>{w1}}  {r[2]}")
