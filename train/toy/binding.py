"""How the toy ImageBind is taught: texts about scenes, which scenes a text fits, and the
contrastive losses.

Texts are either a scene's caption or a short prompt about one thing of it ("a red thing",
"a circle", "a thing moving left", "a small green star on a white background"), phrased
as the captions are, so that zero-shot classification with such prompts (the
measurements in BASE.md) asks what training taught. A batch has several texts that fit
one scene and several scenes that fit one text (the groups with the same caption), so
the text losses are InfoNCE with every fitting pair as a positive (targets spread evenly
over them). The media-to-media losses are instance-level: an image's positive is the video
and the sound *of its own scene*, the same-caption scenes of its group are negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xvila.toy import world

THING_KEYS = ("size", "colour", "shape", "motion")
TAU = 0.05  # InfoNCE temperature on cosine similarities


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def prompt(spec: dict) -> str:
    """A text about one thing: `spec` has any of size/colour/shape/motion and background."""
    words = [spec[k] for k in ("size", "colour") if k in spec] + [spec.get("shape", "thing")]
    text = _a(" ".join(words))
    if "motion" in spec:
        text += " " + world.MOTION_WORDS[spec["motion"]]
    if "background" in spec:
        text += f" on {_a(spec['background'])} background"
    return text


def colour_prompt(colour: str) -> str:
    return prompt({"colour": colour})


def shape_prompt(shape: str) -> str:
    return prompt({"shape": shape})


def motion_prompt(motion: str) -> str:
    return prompt({"motion": motion})


def fits(spec: dict | str, attributes: dict, caption: str) -> bool:
    """Whether a text (a caption string, or a prompt's spec) is true of a scene."""
    if isinstance(spec, str):
        return spec == caption
    if "background" in spec and spec["background"] != attributes["background"]:
        return False
    return any(all(t[k] == spec[k] for k in THING_KEYS if k in spec) for t in attributes["things"])


def sample_text(attributes: dict, caption: str, g: torch.Generator) -> dict | str:
    """A caption (40 %) or a prompt about one of the scene's things with a random non-empty
    subset of its attributes (and its background, a quarter of the time)."""
    r = torch.rand(3, generator=g)
    if r[0] < 0.4:
        return caption
    things = attributes["things"]
    thing = things[int(r[1] * len(things))]
    keep = torch.rand(len(THING_KEYS), generator=g) < 0.4
    if not keep.any():
        keep[int(torch.randint(len(THING_KEYS), (1,), generator=g))] = True
    spec = {k: thing[k] for k, on in zip(THING_KEYS, keep) if on}
    if r[2] < 0.25:
        spec["background"] = attributes["background"]
    return spec


def text_of(spec: dict | str) -> str:
    return spec if isinstance(spec, str) else prompt(spec)


def multi_positive_nce(x: torch.Tensor, y: torch.Tensor, match: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """Symmetric InfoNCE where match[i, j] marks x_i and y_j as a positive pair (each row
    and column has at least one)."""
    logits = F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T / tau
    match = match.float()
    rows = -(match / match.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    cols = -(match.T / match.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return (rows + cols) / 2


def instance_nce(x: torch.Tensor, y: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    return multi_positive_nce(x, y, torch.eye(len(x), dtype=torch.bool, device=x.device), tau)
