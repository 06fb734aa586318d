"""Reading evaluation manifests (JSONL, media paths relative to a root folder).

The X²A benchmark reads the X-to-X conversation format that `train/builders.py` writes
(`heldout.jsonl`): ``{"id", "type", "conversations": [{"from", "value"}, ...], "inputs":
[{"modality", "path"}], "outputs": [{"modality", "path", "caption"}]}``. Human turns hold
one placeholder per input and gpt turns one marker (``<gen:video>``) per output, in order;
the file an output names is the ground truth of that round. Only what evaluation needs is
checked here (`train/data.py` validates fully), so that `xvila` does not depend on `train/`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from xvila import media
from xvila.constants import IMAGE, MEDIA_MODALITIES, VIDEO
from xvila.conversation import PLACEHOLDERS
from xvila.evaluation.stats import EvaluationError

_MARKER = re.compile(r"<gen:(image|video|audio)>")
_PLACEHOLDER = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS.values()))


class ManifestError(EvaluationError):
    """A manifest line that cannot be evaluated; the message names file:line."""


def read_jsonl(path: str | os.PathLike, limit: int | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a JSONL file's non-blank lines, at most `limit` of them."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    n = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and n >= limit:
                return
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ManifestError(f"{path}:{lineno}: not JSON ({err})") from err
            if not isinstance(record, dict):
                raise ManifestError(f"{path}:{lineno}: a record must be a JSON object")
            n += 1
            yield lineno, record


def media_path(root: Path, rel, where: str) -> str:
    """`rel` under `root`, refusing absolute paths and '..' (a manifest must not reach out)."""
    if not isinstance(rel, str) or not rel:
        raise ManifestError(f"{where}: a media path must be a non-empty string, got {rel!r}")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts:
        raise ManifestError(f"{where}: media path {rel!r} must be relative to the manifest's root, without '..'")
    return str(root / p)


@dataclass
class Round:
    text: str  # the human turn, placeholders included
    inputs: list[str]  # absolute paths of this round's inputs, in placeholder order
    output: str | None = None  # modality the gpt turn generates, None for a text-only round
    truth: str | None = None  # the ground-truth file of that output


@dataclass
class Conversation:
    id: str
    type: str
    rounds: list[Round] = field(default_factory=list)

    @property
    def visual_to_visual(self) -> bool:
        """A visual input and a visual output: the highway applies (the α sweep's samples)."""
        inputs = {media_kind_of(p) for r in self.rounds for p in r.inputs}
        return bool(inputs & {IMAGE, VIDEO}) and any(r.output in (IMAGE, VIDEO) for r in self.rounds)


def media_kind_of(path: str) -> str:
    return media.media_kind(path)


def _conversation(record: dict, root: Path, where: str) -> Conversation:
    for key, kind in (("id", str), ("type", str), ("conversations", list), ("inputs", list), ("outputs", list)):
        if not isinstance(record.get(key), kind):
            raise ManifestError(f"{where}: '{key}' must be a {kind.__name__} (an X-to-X conversation record)")
    inputs, outputs = list(record["inputs"]), list(record["outputs"])
    conv = Conversation(record["id"], record["type"])
    turns = record["conversations"]
    for i in range(0, len(turns) - 1, 2):
        human, gpt = turns[i].get("value", ""), turns[i + 1].get("value", "")
        n_in, markers = len(_PLACEHOLDER.findall(human)), _MARKER.findall(gpt)
        if n_in > len(inputs) or len(markers) > len(outputs) or len(markers) > 1:
            raise ManifestError(f"{where}: turn {i}: placeholders/markers do not match 'inputs'/'outputs' "
                                "(at most one output per round)")
        ins, inputs = inputs[:n_in], inputs[n_in:]
        r = Round(human, [media_path(root, x.get("path"), where) for x in ins])
        if markers:
            out, outputs = outputs[0], outputs[1:]
            if out.get("modality") != markers[0] or out.get("modality") not in MEDIA_MODALITIES:
                raise ManifestError(f"{where}: turn {i + 1}: marker <gen:{markers[0]}> but output {out.get('modality')!r}")
            r.output, r.truth = markers[0], media_path(root, out.get("path"), where)
        conv.rounds.append(r)
    # Rounds after the last generated output (a closing "describe it" round) are not scored.
    while conv.rounds and conv.rounds[-1].output is None:
        conv.rounds.pop()
    if not conv.rounds:
        raise ManifestError(f"{where}: the conversation generates no media: nothing to score")
    return conv


def read_x2x(path: str | os.PathLike, root: str | os.PathLike | None = None, limit: int | None = None) -> list[Conversation]:
    """The conversations of an X-to-X manifest; media paths resolved against `root` (the
    manifest's folder by default, as the builders write it)."""
    root = Path(root) if root is not None else Path(path).parent
    convs = [_conversation(r, root, f"{path}:{n}") for n, r in read_jsonl(path, limit)]
    seen = set()
    for c in convs:
        if c.id in seen:
            raise ManifestError(f"{path}: conversation id {c.id!r} appears twice")
        seen.add(c.id)
    return convs
