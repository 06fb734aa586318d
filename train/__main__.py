"""The training entry point: one subcommand per phase, and export.

    python -m train phase1 --config train/configs/phase1.yaml
    python -m train phase2 --config train/configs/phase2.yaml            # starts from runs/phase1/final
    python -m train phase3a --config train/configs/phase3a.yaml
    python -m train phase3b --config train/configs/phase3b.yaml
    python -m train phase3b --config train/configs/phase3b.yaml --resume # continue after a stop
    python -m train phase1 --config train/configs/phase1.yaml steps=100 lr=1e-4 out_dir=runs/try
    python -m train export --from runs/phase3b/final --to out/xvila --push-to-hub you/xvila

Several GPUs or nodes: the same command under `accelerate launch`, e.g.

    accelerate launch --config_file train/configs/accelerate/4x8-a100-zero2.yaml \\
        --machine_rank $RANK --main_process_ip $MASTER -m train phase2 --config train/configs/phase2.yaml

`--config` may be given several times (merged left to right); trailing `key=value` pairs
override single settings (values read as YAML). SIGTERM/SIGINT stop a phase after the
current step with a checkpoint (exit status 0; under `accelerate launch`/torchrun signal
the launcher, which forwards it to every rank); `--resume` continues exactly. A NaN/inf
loss stops it with status 3 and a message naming the step and the samples.
"""

from __future__ import annotations

import argparse
import sys

from train import export
from train.loop import NonFiniteLossError, load_config, train
from train.phases import COMMANDS
from xvila.errors import XVilaError


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, phase in COMMANDS.items():
        p = sub.add_parser(name, help=f"train phase {phase.key} (train/phases.py)")
        p.add_argument("--config", action="append", required=True, help="YAML config (repeatable, merged in order)")
        p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="override a config setting")
    p = sub.add_parser("export", help="re-export a phase's final folder and/or push it to the Hub")
    p.add_argument("--from", dest="source", required=True, help="a folder written by a phase (…/final)")
    p.add_argument("--to", dest="dest", help="where to write the exported folder")
    p.add_argument("--push-to-hub", dest="repo_id", metavar="REPO", help="a Hub model repo id to upload to")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "export":
            if not (args.dest or args.repo_id):
                raise XVilaError("export needs --to and/or --push-to-hub")
            export.main(args.source, args.dest, args.repo_id)
            return 0
        cfg = load_config(args.config, args.overrides, phase=COMMANDS[args.command].key)
        train(cfg, resume=args.resume)
        return 0
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except XVilaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
