"""python -m train.adapters llava --input llava_instruct_150k.json --image-root coco/train2017 --out data/llava.jsonl

Instruction data of other projects -> our conversation records (phase 3a's SFT blend):

    python -m train.adapters llava --input llava_instruct_150k.json --image-root coco/train2017 \\
        --out data/llava.jsonl
    python -m train.adapters alpaca --input alpaca_data.json --out data/alpaca.jsonl

- `llava_instruct(path, image_root)`: LLaVA-Instruct (``{"id", "image", "conversations":
  [{"from": "human"|"gpt", "value"}]}``). `<image>` placeholders are kept; where an item
  has an image but no placeholder, one is put in front of the first human turn (as LLaVA's
  own loader does). The image path becomes `<image_root>/<image>`, relative to the root
  the manifest is read with. Items with a `video` (VideoChat / NExT-GPT style) or `audio`
  key map the same way to `<video>` / `<audio>`; `user`/`assistant` speakers are accepted.
- `alpaca(path)`: ``{"instruction", "input", "output"}`` -> one human turn (instruction,
  then the input after a blank line when there is one) and one gpt turn.

Both give type "sft", no outputs, and stream their input (a JSON array read item by item,
or JSONL). An item that cannot be converted is skipped and counted (`skipped`) with why.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from train.data import GPT, HUMAN, Skipped, placeholder_sequence, validate, write_manifest
from xvila.constants import AUDIO, IMAGE, VIDEO
from xvila.conversation import PLACEHOLDERS
from xvila.errors import XVilaError

SPEAKERS = {"human": HUMAN, "user": HUMAN, "gpt": GPT, "assistant": GPT, "model": GPT}
MEDIA_KEYS = {"image": IMAGE, "video": VIDEO, "audio": AUDIO}
_CHUNK = 1 << 20


def iter_json(path: str | os.PathLike) -> Iterator:
    """The items of a JSON array file, parsed one at a time (never the whole list in memory),
    or the lines of a JSONL file."""
    decoder = json.JSONDecoder()
    with Path(path).open(encoding="utf-8") as f:
        buf = f.read(_CHUNK).lstrip("\ufeff")
        if not buf.lstrip().startswith("["):
            yield from (json.loads(line) for line in _lines_after(buf, f) if line.strip())
            return
        pos, eof = buf.index("[") + 1, False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                item, end = decoder.raw_decode(buf, pos) if pos < len(buf) else (None, len(buf))
            except json.JSONDecodeError:
                if eof:
                    raise
                end = len(buf)
            if end == len(buf) and not eof:  # the item may run past the buffer: read on
                more = f.read(_CHUNK)
                buf, pos, eof = buf[pos:] + more, 0, not more
                continue
            if pos == len(buf):
                raise ValueError(f"{path}: the JSON array is not closed")
            yield item
            pos = end


def _lines_after(head: str, rest) -> Iterator[str]:
    """Lines of `head` (already read) followed by the file's remaining lines."""
    lines = head.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += next(rest, "")  # the line cut by the first read
    yield from lines
    yield from rest


def _join(root: str, rel: str) -> str:
    return str(PurePosixPath(root) / rel) if root else rel


def _llava_record(item: dict, index: int, image_root: str) -> dict:
    turns = []
    for turn in item.get("conversations") or []:
        speaker = SPEAKERS.get(str(turn.get("from", "")).lower())
        if speaker is None:
            raise ValueError(f"unknown speaker {turn.get('from')!r}")
        turns.append({"from": speaker, "value": str(turn.get("value", ""))})
    files: dict[str, list[str]] = {}
    for key, modality in MEDIA_KEYS.items():
        value = item.get(key)
        if value:
            files[modality] = [_join(image_root, v) for v in ([value] if isinstance(value, str) else value)]
    humans = [t for t in turns if t["from"] == HUMAN]
    if files and humans and not any(placeholder_sequence(t["value"]) for t in humans):
        humans[0]["value"] = "".join(PLACEHOLDERS[m] + "\n" for m, fs in files.items() for _ in fs) + humans[0]["value"]
    order = [m for t in humans for m in placeholder_sequence(t["value"])]
    for modality, fs in files.items():
        if order.count(modality) != len(fs):
            raise ValueError(f"{order.count(modality)} {PLACEHOLDERS[modality]} placeholder(s) for {len(fs)} file(s)")
    queues = {m: iter(fs) for m, fs in files.items()}
    inputs = [{"modality": m, "path": next(queues[m])} for m in order if m in queues]
    record = {"id": str(item.get("id", index)), "type": "sft", "conversations": turns, "inputs": inputs, "outputs": []}
    validate(record)
    return record


def _convert(path, convert, skipped: Skipped | None) -> Iterator[dict]:
    skipped = skipped if skipped is not None else Skipped()
    for i, item in enumerate(iter_json(path)):
        try:
            if not isinstance(item, dict):
                raise ValueError(f"expected an object, got {type(item).__name__}")
            yield convert(item, i)
        except (ValueError, TypeError, KeyError) as err:
            skipped.add(f"{path}#{i}", f"item {i}: {err}", kind="BadItem")


def llava_instruct(path: str | os.PathLike, image_root: str = "", skipped: Skipped | None = None) -> Iterator[dict]:
    """LLaVA-Instruct items -> conversation records (type "sft"); see the module docstring."""
    return _convert(path, lambda item, i: _llava_record(item, i, image_root), skipped)


def _alpaca_record(item: dict, index: int) -> dict:
    human = str(item["instruction"])
    if str(item.get("input") or "").strip():
        human += "\n\n" + str(item["input"])
    record = {"id": f"alpaca-{index}", "type": "sft",
              "conversations": [{"from": HUMAN, "value": human}, {"from": GPT, "value": str(item["output"])}],
              "inputs": [], "outputs": []}
    validate(record)
    return record


def alpaca(path: str | os.PathLike, skipped: Skipped | None = None) -> Iterator[dict]:
    """Alpaca items -> text-only conversation records (type "sft")."""
    return _convert(path, _alpaca_record, skipped)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.adapters", description=__doc__.split("\n\n")[1])
    parser.add_argument("adapter", choices=["llava", "alpaca"])
    parser.add_argument("--input", required=True, help="the project's JSON (array) or JSONL file")
    parser.add_argument("--image-root", default="", help="llava: folder of the images, relative to the data root")
    parser.add_argument("--out", required=True, help="the JSONL manifest to write")
    args = parser.parse_args(argv)
    skipped = Skipped()
    records = (llava_instruct(args.input, args.image_root, skipped) if args.adapter == "llava"
               else alpaca(args.input, skipped))
    try:
        n = write_manifest(records, args.out)
    except (XVilaError, OSError, ValueError) as err:  # an unreadable input file
        parser.exit(2, f"error: {err}\n")
    print(f"{n} records -> {args.out}")
    print(skipped.summary())
    return n


if __name__ == "__main__":
    main()
