"""Flickr30k 1K test (Karpathy split) retrieval benchmark: `loupe eval` with the standard defaults.

    python benchmarks/flickr30k_eval.py --images /data/flickr30k-images

Defaults: ViT-B-32 laion2b_s34b_b79k (open_clip publishes T2I 66.78/88.38/93.10 and
I2T 84.10/96.20/98.30 for it; the table prints them beside the measured figures), the split's
captions from ../shared/data/flickr30k_karpathy_test/captions.json, JSON written to
flickr30k-<model>-<tag>.json. Any `loupe eval` option after `--` is passed through.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ANNOTATIONS = REPO.parent / "shared" / "data" / "flickr30k_karpathy_test" / "captions.json"


def build_command(argv: list[str] | None = None) -> list[str]:
    """The `loupe eval` argument list this script runs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, help="the flickr30k-images folder (download it yourself)")
    parser.add_argument("--annotations", default=str(DEFAULT_ANNOTATIONS), help="Karpathy, LAVIS or captions.json file")
    parser.add_argument("--model", default=None, help="open_clip model (default ViT-B-32)")
    parser.add_argument("--pretrained", default=None, help="pretrained tag (default laion2b_s34b_b79k)")
    parser.add_argument("--checkpoint", default=None, help="local weights file instead of a pretrained tag")
    parser.add_argument("--json", default=None, help="report file (default flickr30k-<model>-<tag>.json)")
    parser.add_argument("extra", nargs="*", help="more `loupe eval` options, after --")
    args = parser.parse_args(argv)
    if args.checkpoint is None and args.model is None:
        args.model, args.pretrained = "ViT-B-32", args.pretrained or "laion2b_s34b_b79k"
    tag = Path(args.checkpoint).stem if args.checkpoint else args.pretrained or "random"
    out = args.json or f"flickr30k-{args.model or 'checkpoint'}-{tag}.json"
    cmd = ["eval", "--images", args.images, "--annotations", args.annotations, "--json", out]
    for flag in ("model", "pretrained", "checkpoint"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    return cmd + args.extra


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(REPO))
    from loupe.cli.main import run

    sys.argv = ["loupe", *build_command(argv)]
    run()


if __name__ == "__main__":
    main()
