"""Export: an `XVila.from_pretrained`-loadable folder with a model card, optionally pushed to the Hub.

    python -m train export --from runs/phase3b/final --to out/xvila-7b
    python -m train export --from runs/phase3b/final --push-to-hub you/xvila-7b

Every phase ends by writing its `final/` folder with `write_folder` (the next phase starts
from it); this command re-exports one elsewhere and/or uploads it. A folder holds what
`XVila.save_pretrained` writes, plus:
- `training.json`: every phase run so far (its hyperparameters, manifests and record
  counts, skipped samples), carried from phase to phase;
- `README.md`: the model card (use, base weights and their licences, phases, data).
The folder is written as `NAME.tmp` and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from xvila.config import PRESETS, XVilaConfig
from xvila.decoders.video import ZEROSCOPE_REPO
from xvila.errors import XVilaError
from xvila.fileio import write_json
from xvila.model import XVila

HISTORY = "training.json"
# Licences of the default base weights (the model cards of these repos are authoritative).
LICENCES = {
    "nielsr/imagebind-huge": "CC-BY-NC-SA 4.0 (ImageBind)",
    "lmsys/vicuna-7b-v1.5": "Llama 2 Community License (Vicuna is fine-tuned from Llama 2)",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "CreativeML OpenRAIL-M",
    "cvssp/audioldm-s-full-v2": "CC-BY-NC-SA 4.0 (AudioLDM)",
    "adamdad/videocrafterv2_diffusers": "per its model card (VideoCrafter2's weights: research use)",
    "cerspense/zeroscope_v2_576w": "per its model card (zeroscope_v2: CC-BY-NC 4.0)",
}
PHASE_NAMES = {"1": "encoder-LLM-decoder alignment", "2": "interleaved pre-training",
               "3a": "X-to-X textual alignment", "3b": "X-to-X visual alignment (VEH)"}
HYPERPARAMETERS = ("steps", "global_batch", "micro_batch", "lr", "warmup_steps", "min_lr_ratio", "betas",
                   "weight_decay", "grad_clip", "mixed_precision", "load_in_4bit", "seed")


class PushToHubError(XVilaError):
    """The folder could not be uploaded (no network, offline mode, no token, no rights)."""


# ------------------------------------------------------------------------------ folder
def read_history(folder: str | os.PathLike | None) -> list[dict]:
    path = Path(folder) / HISTORY if folder else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else []


def write_folder(model, folder: str | os.PathLike, phase_record: dict | None = None,
                 history: list[dict] | None = None) -> Path:
    """`model.save_pretrained` + training.json + README.md into `folder`, atomically.

    `history` defaults to the init folder's (`phase_record["init"]`) phases; `phase_record`
    (this phase) is appended."""
    folder = Path(folder)
    if history is None:
        history = read_history((phase_record or {}).get("init"))
    history = list(history) + ([phase_record] if phase_record else [])
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trained_decoders = ("image", "video") if any(h.get("phase") == "3b" for h in history) else ()
    model.save_pretrained(tmp, write_decoders=trained_decoders)  # phase 3b's U-Nets are not the base repo's
    write_json(history, tmp / HISTORY)
    (tmp / "README.md").write_text(model_card(model.config, history, Path(tmp)))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


# -------------------------------------------------------------------------- model card
def _licence(source) -> str:
    if source is None:
        return "random weights (no licence attached)"
    return LICENCES.get(str(source), "see the source's model card")


def model_card(config, history: list[dict], folder: Path | None = None) -> str:
    # Where the base parts came from: the preset the first phase started from (a loaded
    # folder's config names its own subfolders instead).
    first = history[0].get("init") if history else None
    origin = XVilaConfig.from_name(first) if first in PRESETS else config
    tuned = " (U-Net fine-tuned in phase 3b)" if any(h.get("phase") == "3b" for h in history) else ""
    parts = [("LLM", origin.llm, ""), ("ImageBind", origin.imagebind, "")]
    parts += [(f"{m} decoder", origin.decoders.get(m), tuned if m in ("image", "video") else "")
              for m in ("image", "video", "audio")]
    if origin.decoders.get("video") == "adamdad/videocrafterv2_diffusers":
        parts.append(("video decoder VAE + text encoder", ZEROSCOPE_REPO, ""))
    rows = "\n".join(f"| {name}{note} | {src or 'random weights (' + origin.name + ')'} | {_licence(src)} |"
                     for name, src, note in parts)
    phases = "\n".join(
        f"| {h['phase']} | {PHASE_NAMES.get(h['phase'], '')} | {', '.join(f'{g} {n:,}' for g, n in h.get('trains', {}).items())} "
        f"| {h.get('steps_done', '?')} | " + ", ".join(
            [f"{k}={h['hyperparameters'][k]}" for k in HYPERPARAMETERS if k in h.get("hyperparameters", {})]
            + ([f"condition={h['condition']}"] if "condition" in h else [])) + " |"
        for h in history)
    data = "\n".join(
        f"| {h['phase']} | {d['path']} | {d['records']:,} | {d['weight']:g} | "
        f"{sum(h.get('skipped', {}).values()):,} |"
        for h in history for d in h.get("data", []))
    defaults = "\n".join(f"- `{repo}`: {licence}" for repo, licence in LICENCES.items())
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder else []
    return f"""---
license: other
license_name: mixed
library_name: xvila
tags: [x-vila, any-to-any, multimodal, image, video, audio]
---

# X-VILA ({config.name})

An any-to-any chat model over text, image, video and audio (ImageBind -> P_in -> LLM with
LoRA and generation tokens -> P_out -> diffusion decoders, with the visual embedding
highway), trained with this repository's three-phase recipe (X-VILA, Ye et al., 2024).

```python
from xvila import XVila
model = XVila.from_pretrained("path/or/repo-id")
for event in model.new_chat().send("Make a video like this photo", media=["photo.jpg"]):
    ...
```

Folder: {', '.join(subfolders) or '-'} + config.json, xvila.safetensors, {HISTORY}.

## Base weights and licences

The weights here derive from these parts; each keeps its own licence, and the most
restrictive applies to the whole (ImageBind's and AudioLDM's CC-BY-NC-SA: non-commercial,
share-alike).

| part | source | licence |
|---|---|---|
{rows}

The recipe's default base weights (preset `xvila-7b`) and their licences:

{defaults}

## Training

| phase | | trains | steps | hyperparameters |
|---|---|---|---|---|
{phases or '| - | | | | |'}

## Data

| phase | manifest | records | weight | samples skipped |
|---|---|---|---|---|
{data or '| - | | | | |'}

Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from the preset {json.dumps(origin.name)}.
"""


# ------------------------------------------------------------------------------ the Hub
def push_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = True) -> str:
    """Upload the folder to a Hub model repo (created if needed); returns the commit URL."""
    import huggingface_hub
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PushToHubError(f"{folder} is not an exported X-VILA folder (no config.json)")
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise PushToHubError(f"cannot push {folder} to {repo_id}: HF_HUB_OFFLINE is set; unset it (and log in "
                             "with `hf auth login`) to upload")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="X-VILA export")
    except Exception as err:  # network, auth, rights: all end here, named
        raise PushToHubError(f"could not push {folder} to the Hub repo {repo_id}: {type(err).__name__}: {err}. "
                             "Check your network and `hf auth login`.") from err
    return str(info)


def main(source: str, dest: str | None = None, repo_id: str | None = None) -> Path:
    """Re-export `source` (a phase's final folder) to `dest`, and/or push it to `repo_id`."""
    folder = Path(source)
    if dest:
        model = XVila.from_pretrained(source)
        folder = write_folder(model, dest, history=read_history(source))
        print(f"exported {source} -> {folder}")
    if repo_id:
        print(f"pushed {folder} -> {push_to_hub(folder, repo_id)}")
    return folder
