"""python -m xvila.evaluation x2a --checkpoint C --data heldout.jsonl --out runs/x2a [--modes ta,veh,text]
python -m xvila.evaluation x2a ... --alpha-sweep 0,0.2,0.4,0.6,0.8,1.0
python -m xvila.evaluation understand --task vqav2|vizwiz|mmmu|caption --checkpoint C --data D.jsonl --out DIR

The model loads once (on the GPU when there is one); see `benchmark.py` and
`understand.py` for what each command runs and writes.
"""

from __future__ import annotations

import argparse
import sys

from xvila.errors import XVilaError
from xvila.evaluation.benchmark import MODES, X2ASettings, run_x2a
from xvila.evaluation.manifests import read_x2x
from xvila.evaluation.understand import read_items, run_understand
from xvila.model import XVila


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"α values must lie between 0 and 1, got {text!r}")
    return values


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)}; got {text!r}")
    return modes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xvila.evaluation", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", default="tiny-random", help="preset, checkpoint folder or Hub repo id")
    common.add_argument("--data", required=True, help="the JSONL manifest")
    common.add_argument("--out", required=True, help="output folder (a run there is resumed)")
    common.add_argument("--root", default=None, help="folder the manifest's media paths are relative to (default: its folder)")
    common.add_argument("--limit", type=int, default=None, help="only the first N records")
    common.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    common.add_argument("--max-new-tokens", type=int, default=None)
    common.add_argument("--no-progress", action="store_true", help="no progress bar (logs)")
    x = sub.add_parser("x2a", parents=[common], help="the X²A benchmark and its ablations")
    x.add_argument("--modes", type=_modes, default=("text", "ta", "veh"), help="comma-separated, in table order: text, ta, veh")
    x.add_argument("--alpha", type=float, default=None, help="VEH rate of the veh mode (default: the model's)")
    x.add_argument("--alpha-sweep", type=_floats, default=(), help="e.g. 0,0.2,0.4,0.6,0.8,1.0 (veh mode only)")
    x.add_argument("--steps", type=int, default=None, help="denoising steps (default: the decoders')")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--temperature", type=float, default=0.0, help="<= 0: greedy")
    x.add_argument("--batch-size", type=int, default=8, help="ImageBind batch for scoring")
    u = sub.add_parser("understand", parents=[common], help="VQAv2, VizWiz, MMMU, captioning")
    u.add_argument("--task", required=True, choices=("vqav2", "vizwiz", "mmmu", "caption"))
    return p


def main(argv: list[str] | None = None, model=None) -> dict:
    """Parse `argv` and run; `model` (an XVila) skips loading `--checkpoint` (tests)."""
    args = parser().parse_args(argv)
    # Read the manifest before loading the model: a typo should not cost minutes of loading.
    if args.command == "x2a":
        read_x2x(args.data, args.root, args.limit)
    else:
        read_items(args.task, args.data, args.root, args.limit)
    if model is None:
        model = XVila.from_pretrained(args.checkpoint, device=args.device)
    progress = not args.no_progress
    if args.command == "x2a":
        s = X2ASettings(modes=args.modes, alpha=args.alpha, alpha_sweep=args.alpha_sweep, limit=args.limit,
                        steps=args.steps, seed=args.seed, temperature=args.temperature,
                        max_new_tokens=args.max_new_tokens or 128, batch_size=args.batch_size, root=args.root)
        return run_x2a(model, args.data, args.out, s, checkpoint=args.checkpoint, progress=progress)
    return run_understand(model, args.task, args.data, args.out, checkpoint=args.checkpoint, limit=args.limit,
                          max_new_tokens=args.max_new_tokens or 64, root=args.root, progress=progress)


if __name__ == "__main__":
    try:
        main()
    except XVilaError as err:
        sys.exit(f"error: {err}")
