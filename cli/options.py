"""Option types shared by several commands, so every command spells them the same way."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Callable, Optional, get_type_hints

import typer

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="open_clip model name (default: the index's model, else ViT-B-32 with laion2b_s34b_b79k)."),
]
PretrainedOpt = Annotated[
    Optional[str],
    typer.Option("--pretrained", help="open_clip pretrained tag of --model (or of the index's model), fetched into open_clip's cache."),
]
CheckpointOpt = Annotated[
    Optional[Path],
    typer.Option("--checkpoint", "-c", help="Local weights file (state dict or open_clip checkpoint); works offline."),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")
]
TextPrecisionOpt = Annotated[
    str,
    typer.Option(
        "--text-precision",
        help="Query text encoding on CPU: auto (fp32, as every search path), fp32, or bf16 (faster on CPUs with AMX/AVX512-BF16, cosine ~0.9999 to fp32).",
    ),
]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="Image encoding arithmetic: auto (fp16 mixed precision on CUDA; on CPUs fp32, or bf16 for a run of 200 photos or more "
        "on a CPU with AMX/AVX512-BF16), fp32, bf16 or int8 "
        "(faster on CPUs with AMX/AVX512-BF16, resp. for ViT towers on x86; recall may move by a few tenths of a point). Anything but "
        "fp32 is checked on the first batch against fp32 (--min-cosine) and falls back to fp32 if it strays.",
    ),
]
BackendOpt = Annotated[
    str,
    typer.Option(
        "--backend",
        help="What runs the image tower: auto (ONNX Runtime fp32 on CPUs, exported once per model into the user cache, "
        "then run without torch; torch for bf16 and on GPUs), onnx, or torch. `loupe info` shows what made an index's vectors.",
    ),
]
MinCosineOpt = Annotated[
    float,
    typer.Option("--min-cosine", min=0.0, max=1.0, help="How close (cosine) image vectors of a faster precision must stay to fp32's."),
]
HomeOpt = Annotated[
    Optional[Path],
    typer.Option("--home", help="Where the catalog and vector files live (default $LOUPE_HOME or the user data dir).", envvar="LOUPE_HOME"),
]
DbOpt = Annotated[
    Optional[str],
    typer.Option("--db", help="SQLAlchemy URL of the catalog (default SQLite under --home), e.g. postgresql+psycopg://user@host/loupe.", envvar="LOUPE_DB"),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Items per model batch.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object per line instead of a table.")]
NprobeOpt = Annotated[
    Optional[int],
    typer.Option("--nprobe", min=1, help="Inverted lists an IVF index visits per query (default 8*sqrt(lists)); more: better recall, slower."),
]
EfSearchOpt = Annotated[
    Optional[int],
    typer.Option("--ef-search", min=1, help="Search depth of an HNSW index (default 256); more: better recall, slower."),
]
SearchParamsOpt = Annotated[
    Optional[str],
    typer.Option("--search-params", help="FAISS search parameters, e.g. 'nprobe=64,efSearch=128' (--nprobe/--ef-search win over it). `loupe search` with any of these three searches in its own process, not on a running `loupe serve`."),
]
NoWaitOpt = Annotated[
    bool, typer.Option("--no-wait", help="Fail at once if another loupe process is writing this index, instead of waiting.")
]


# ---- groups of options that commands take together ------------------------------------------

@dataclass(frozen=True)
class ModelOptions:
    """--model, --pretrained, --checkpoint, --device: which model, and where it runs."""

    model: ModelOpt = None
    pretrained: PretrainedOpt = None
    checkpoint: CheckpointOpt = None
    device: DeviceOpt = "auto"


@dataclass(frozen=True)
class AnnOptions:
    """--nprobe, --ef-search, --search-params: how deep an approximate (FAISS) index searches."""

    nprobe: NprobeOpt = None
    ef_search: EfSearchOpt = None
    search_params: SearchParamsOpt = None

    def joined(self) -> str | None:
        """The three as one FAISS parameter string (--nprobe/--ef-search win over --search-params)."""
        from loupe.indexer.storage.vectors import join_search_params

        return join_search_params(self.search_params, self.nprobe, self.ef_search)


@dataclass(frozen=True)
class LocationOptions:
    """--home, --db: which index."""

    home: HomeOpt = None
    db: DbOpt = None


def grouped(command: Callable) -> Callable:
    """Lets a typer command take a group of options (a dataclass above) as one parameter.

    Typer sees the group's fields as options in the parameter's place; the command receives them
    as one value of the group.
    """
    signature = inspect.signature(command, eval_str=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, type] = {}
    for param in signature.parameters.values():
        group = param.annotation
        if not (isinstance(group, type) and is_dataclass(group)):
            params.append(param)
            continue
        groups[param.name] = group
        hints = get_type_hints(group, include_extras=True)
        params += [inspect.Parameter(f.name, param.kind, default=f.default, annotation=hints[f.name]) for f in fields(group)]

    @functools.wraps(command)
    def run(**values):
        for name, group in groups.items():
            values[name] = group(**{f.name: values.pop(f.name) for f in fields(group)})
        return command(**values)

    run.__signature__ = signature.replace(parameters=params)
    run.__annotations__ = {p.name: p.annotation for p in params} | {"return": signature.return_annotation}
    return run
