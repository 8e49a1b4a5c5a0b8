"""`loupe duplicates`: near-duplicate groups, the keeper suggestion, and resolving them safely."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from loupe.cli.app import app, fail, open_store, writing
from loupe.cli.options import JsonOpt, LocationOptions, NoWaitOpt, grouped


@app.command()
@grouped
def duplicates(
    tier: Annotated[Optional[str], typer.Option("--tier", help="Only one tier: same (one picture in several files) or similar (bursts, retakes).")] = None,
    folder: Annotated[Optional[Path], typer.Option("--in", help="Only files under this folder.")] = None,
    after: Annotated[Optional[str], typer.Option("--after", help="Only files taken/modified on or after: YYYY[-MM[-DD]].")] = None,
    before: Annotated[Optional[str], typer.Option("--before", help="Only files taken/modified before: YYYY[-MM[-DD]].")] = None,
    date_field: Annotated[str, typer.Option("--date-field", help="auto (capture time, else modified), taken, or modified.")] = "auto",
    resolve: Annotated[bool, typer.Option("--resolve", help="Move every file but the keeper of each listed group to <indexed root>/.loupe-duplicates (same tier unless --tier similar). Nothing is deleted; journalled.")] = False,
    move_to: Annotated[Optional[Path], typer.Option("--move-to", help="Like --resolve, into this folder instead.")] = None,
    undo: Annotated[bool, typer.Option("--undo", help="Put back every file a resolve moved, byte-identical.")] = False,
    as_json: JsonOpt = False,
    at: LocationOptions = LocationOptions(),
    no_wait: NoWaitOpt = False,
) -> None:
    """Find near-duplicates: "same" (re-encoded, resized, cropped, brightened, slightly rotated,
    converted copies of one picture; identical files) and "similar" (bursts, retakes), each group
    with the file to keep and why.

    Only what `loupe index` computed is read: grouping is incremental (new photos are verified
    against their candidates only). --resolve / --move-to move the other files of each group aside
    (never delete; refused for files changed since they were indexed); --undo puts them back.
    """
    from loupe.retrieval.engine import dup_moves
    from loupe.retrieval.engine.duplicates import TIERS, find_groups
    from loupe.retrieval.engine.requests import Filters, RequestError

    if tier is not None and tier not in TIERS:
        raise fail(f"--tier must be one of {', '.join(TIERS)}, not '{tier}'")
    if undo and (resolve or move_to):
        raise fail("--undo cannot be combined with --resolve or --move-to")
    try:
        filters = Filters.parse(folder, None, after, before, date_field)
    except RequestError as exc:
        raise fail(str(exc))
    if filters.folder and not Path(filters.folder).is_dir():
        raise fail(f"--in: not a folder: {filters.folder}")
    store = open_store(at.home, at.db)
    if store.meta() is None:
        raise fail("the index is empty: run `loupe index FOLDER` first")
    if undo:
        with writing(store, no_wait):
            if not dup_moves.pending(store):
                typer.echo("nothing to undo")
                return
            out = dup_moves.undo(store)
        for p in out.restored:
            typer.echo(f"restored {p}")
        for p in out.problems:
            typer.echo(f"loupe: warning: {p}", err=True)
        typer.echo(f"{len(out.restored)} files put back")
        return
    acting = resolve or move_to is not None
    tiers = (tier,) if tier else (("same",) if acting else TIERS)
    with writing(store, no_wait):
        grouping = find_groups(store, tiers, filters if filters.active() else None)
        if acting:
            out = dup_moves.resolve(store, grouping.groups, move_to=move_to)
    if grouping.lacking:
        typer.echo(f"loupe: note: {grouping.lacking} photos have no near-duplicate signal yet: run `loupe index` on their folders", err=True)
    if acting:
        for src, dst in out.moved:
            typer.echo(f"moved {src} -> {dst}")
        for gid, why in out.refused:
            typer.echo(f"loupe: refused group {gid}: {why}", err=True)
        typer.echo(f"{len(out.moved)} files moved ({len(out.refused)} groups refused); `loupe duplicates --undo` puts them back")
        if out.refused and not out.moved:
            raise typer.Exit(1)
        return
    if as_json:
        for g in grouping.groups:
            typer.echo(json.dumps(g.to_json(), ensure_ascii=False))
        return
    if not grouping.groups:
        typer.echo(f"no near-duplicates among {grouping.contents} photos")
        return
    for g in grouping.groups:
        typer.echo(f"{g.tier:<8} {len(g.members)} files  keep {g.keep}  ({g.reason})")
        for m in g.members:
            mark = "*" if m.path == g.keep else " "
            when = m.taken_at.isoformat(sep=" ") if m.taken_at is not None else "-"
            typer.echo(f"  {mark} {m.width}x{m.height:<6} {m.size / 1024:8.0f} KiB  {m.format:<4} sharp {m.sharpness:7.0f}  {when:<19}  {m.path}")
    counts = {t: sum(g.tier == t for g in grouping.groups) for t in TIERS}
    typer.echo(f"{counts['same']} same-photo groups, {counts['similar']} similar groups among {grouping.contents} photos")
