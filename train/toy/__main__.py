"""The toy world's commands.

    python -m train.toy base                  # train the base parts from nothing -> assets/toy/ (~1 h on 2 CPU cores)
    python -m train.toy base --work DIR       # stage checkpoints there (default runs/toy-base); rerun to resume
    python -m train.toy measure-base          # held-out measurements of assets/toy/ -> assets/toy/BASE.md
    python -m train.toy measure-base --work runs/toy-base   # the finished stages of a running base (printed)
    python -m train.toy xvila                 # the X-VILA recipe on the world from assets/toy/ -> assets/toy/xvila/
    python -m train.toy xvila --steps-scale 0.05 --work /tmp/w --out /tmp/toy-xvila   # a quick trial
    python -m train.toy results               # the toy X-VILA on held-out scenes -> assets/toy/RESULTS.md + plots (~10 min)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from train.toy import base as b
from train.toy import measure as m
from train.toy import results
from train.toy.base import ASSETS
from train.toy import xvila as recipe
from train.toy.data import DataSpec


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m train.toy", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    base = sub.add_parser("base", help="train the base parts and export them")
    base.add_argument("--work", type=Path, default=Path("runs/toy-base"), help="stage checkpoints (resumable)")
    base.add_argument("--out", type=Path, default=None, help="export folder (default assets/toy)")
    base.add_argument("--groups", type=int, default=None, help="scene groups in the bank (trial runs)")
    base.add_argument("--jobs", type=int, default=4, help="1: the stage chains one after another (2 threads)")
    base.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps (trial runs)")
    measure = sub.add_parser("measure-base", help="measure the exported base on held-out scenes -> BASE.md")
    measure.add_argument("--base", type=Path, default=None, help="exported base (default assets/toy)")
    measure.add_argument("--n", type=int, default=None, help="held-out scenes per measurement")
    measure.add_argument("--work", type=Path, default=None,
                         help="measure the finished stages of a running `base` in this folder instead (printed)")
    measure.add_argument("--report", type=Path, default=None, help="markdown to write (default <base>/BASE.md)")
    results.add_parser(sub)
    xv = sub.add_parser("xvila", help="build the data and run phases 1, 2, 3a, 3b from the base, then export")
    xv.add_argument("--work", type=Path, default=recipe.WORK, help="data and phase folders (rerun to resume)")
    xv.add_argument("--base", type=Path, default=recipe.TOY_ASSETS, help="the exported base parts (default assets/toy)")
    xv.add_argument("--out", type=Path, default=None, help="export folder (default <base>/xvila)")
    xv.add_argument("--videos", type=int, default=DataSpec.videos, help="training videos of 3 scenes each")
    xv.add_argument("--test-videos", type=int, default=DataSpec.test_videos, help="held-out videos")
    xv.add_argument("--steps-scale", type=float, default=1.0, help="multiply every phase's steps (trial runs)")
    xv.add_argument("--steps", type=int, default=None, help="every phase runs exactly this many steps (tests)")
    xv.add_argument("--batch", type=int, default=None, help="every phase's global and micro batch (trial runs)")
    xv.add_argument("--threads", type=int, default=1, help="torch threads per phase process")
    args = parser.parse_args(argv)
    if args.command == "xvila":
        try:
            recipe.run_recipe(args.work, args.base, args.out, DataSpec(args.videos, args.test_videos),
                              args.steps_scale, args.steps, args.threads, args.batch)
        except recipe.XVilaError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "results":
        results.run(args)
        return 0
    if args.command == "base":
        kwargs = {"work": args.work, "steps_scale": args.steps_scale, "jobs": args.jobs}
        if args.out is not None:
            kwargs["out"] = args.out
        if args.groups is not None:
            kwargs["groups"] = args.groups
        b.run_base(**kwargs)
        return 0
    if args.work is not None:
        for name, (k, total) in m.measure_partial(args.work, **({"n": args.n} if args.n else {})).items():
            print(f"{name}: {k}/{total} = {k / total:.1%}")
        return 0

    folder = args.base or ASSETS
    sizes = {"n": args.n, "n_video": max(1, args.n // 2)} if args.n else {}  # videos cost the most
    m.write_report(folder, args.report or folder / "BASE.md", **sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
