"""python -m xvila.evaluation understand --task vqav2 --checkpoint C --data vqav2.jsonl --out runs/vqav2

Understanding benchmarks (paper Tables 4-5) on local JSONL manifests, media paths relative
to the manifest's folder (or `--root`):

- `vqav2`, `vizwiz`: ``{"id", "image", "question", "answers": [10 strings or {"answer"}]}``,
  scored with the official VQA accuracy;
- `mmmu`: ``{"id", "question", "options": [...], "answer": "B", "images": [...]}``
  (or "image"), scored by the letter the reply chooses;
- `caption`: ``{"id", "path", "captions": [references], "prompt"?}`` (an image, video or
  audio file), scored with CIDEr and BLEU-4.

Each sample is one greedy text reply through the public chat API; results go to
`DIR/results.json` and `DIR/results.md` with 95 % bootstrap intervals, and a killed run
resumes from `DIR/samples.jsonl`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xvila import media as media_io
from xvila.errors import XVilaError
from xvila.evaluation.answers import LETTERS, choice_accuracy, choice_prompt, vqa_accuracy
from xvila.evaluation.captions import caption_scores
from xvila.evaluation.manifests import ManifestError, media_path, read_jsonl
from xvila.evaluation.records import SampleLog, Throughput, write_json, write_text
from xvila.evaluation.stats import EvaluationError, cell, summary

TASKS = ("vqav2", "vizwiz", "mmmu", "caption")
SHORT = "Answer the question using a single word or phrase."  # LLaVA-1.5's VQA prompt
VIZWIZ = "When the provided information is insufficient, respond with 'Unanswerable'. " + SHORT
CAPTION_PROMPTS = {"image": "Describe this image in one sentence.", "video": "Describe this video in one sentence.",
                   "audio": "Describe this sound in one sentence."}
# Paper Table 4 (X-VILA 7B), for reading a real run's numbers.
PAPER = {"vqav2": "72.9", "vizwiz": "50.9", "mmmu": "33.9 (MMMU-val)"}


@dataclass
class Item:
    id: str
    prompt: str
    media: list[str]
    truth: dict  # what scoring needs: answers / options+answer / captions


def _need(record: dict, key: str, kind, where: str):
    value = record.get(key)
    if not isinstance(value, kind) or (isinstance(value, (str, list)) and not value):
        raise ManifestError(f"{where}: '{key}' must be a non-empty {getattr(kind, '__name__', kind)}")
    return value


def _item(task: str, record: dict, root: Path, where: str) -> Item:
    rid = str(_need(record, "id", (str, int), where))
    if task in ("vqav2", "vizwiz"):
        question = _need(record, "question", str, where)
        return Item(rid, f"{question}\n{VIZWIZ if task == 'vizwiz' else SHORT}",
                    [media_path(root, _need(record, "image", str, where), where)],
                    {"answers": _need(record, "answers", list, where)})
    if task == "mmmu":
        options = [str(o) for o in _need(record, "options", list, where)]
        answer = _need(record, "answer", str, where).strip().upper()
        if answer not in LETTERS[: len(options)]:
            raise ManifestError(f"{where}: 'answer' {answer!r} is not the letter of one of the {len(options)} options")
        images = record.get("images", [record["image"]] if record.get("image") else [])
        if not isinstance(images, list):
            raise ManifestError(f"{where}: 'images' must be a list of paths")
        # MMMU's "<image 1>" tags are not X-VILA placeholders: the images go before the text.
        return Item(rid, choice_prompt(_need(record, "question", str, where), options),
                    [media_path(root, p, where) for p in images], {"options": options, "answer": answer})
    path = media_path(root, _need(record, "path", str, where), where)
    prompt = record.get("prompt") or CAPTION_PROMPTS[media_io.media_kind(path)]
    captions = _need(record, "captions", list, where)
    if not all(isinstance(c, str) and c.strip() for c in captions):
        raise ManifestError(f"{where}: 'captions' must be non-empty strings")
    return Item(rid, prompt, [path], {"captions": captions})


def read_items(task: str, data: str, root: str | None = None, limit: int | None = None) -> list[Item]:
    if task not in TASKS:
        raise EvaluationError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    base = Path(root) if root is not None else Path(data).parent
    items = [_item(task, r, base, f"{data}:{n}") for n, r in read_jsonl(data, limit)]
    if len({i.id for i in items}) != len(items):
        raise ManifestError(f"{data}: ids must be unique")
    return items


def reply(model, item: Item, max_new_tokens: int) -> str:
    chat = model.new_chat()
    events = chat.send(item.prompt, media=item.media, output="text", temperature=0.0, max_new_tokens=max_new_tokens)
    return "".join(e.text for e in events if e.kind == "text").strip()


def score(task: str, item: Item, text: str) -> float | None:
    """×100 per-sample score; captioning is scored over the whole corpus at the end."""
    if task in ("vqav2", "vizwiz"):
        return 100.0 * vqa_accuracy(text, item.truth["answers"])
    if task == "mmmu":
        return 100.0 * choice_accuracy(text, item.truth["options"], item.truth["answer"])
    return None


def run_understand(model, task: str, data: str, out: str, checkpoint: str = "", limit: int | None = None,
                   max_new_tokens: int = 64, root: str | None = None, progress: bool = True) -> dict:
    items = read_items(task, data, root, limit)
    settings = {"task": task, "checkpoint": checkpoint, "data": str(Path(data).resolve()), "root": root,
                "max_new_tokens": max_new_tokens}
    log = SampleLog(out, settings)
    speed = Throughput(model.device)
    from tqdm.auto import tqdm

    todo = [i for i in items if i.id not in log.done]
    with tqdm(total=len(items), initial=len(items) - len(todo), unit="sample", desc=task, disable=not progress,
              dynamic_ncols=True) as bar:
        for item in todo:
            try:
                text = reply(model, item, max_new_tokens)
                log.add({"key": item.id, "id": item.id, "reply": text, "score": score(task, item, text)})
            except XVilaError as err:  # an unreadable file or a bad record: counted, the run goes on
                log.add({"key": item.id, "id": item.id, "reply": None, "score": None,
                         "error": f"{type(err).__name__}: {err}"})
            speed.tick()
            bar.update(1)
    print(speed.line())
    records = [log.done[i.id] for i in items]
    ok = [(r, i) for r, i in zip(records, items) if "error" not in r]
    if not ok:
        raise EvaluationError(f"{data}: every sample failed; first error: {records[0]['error']}")
    if task == "caption":
        metrics = caption_scores([r["reply"] for r, _ in ok], [i.truth["captions"] for _, i in ok])
    else:
        metrics = {"VQA accuracy" if task != "mmmu" else "accuracy": summary([r["score"] for r, _ in ok])}
    results = {"task": task, "settings": {**settings, "limit": limit}, "throughput": speed.record(),
               "metrics": metrics, "failed": len(records) - len(ok), "samples": records}
    write_json(Path(out) / "results.json", results)
    write_text(Path(out) / "results.md", _markdown(task, results))
    return results


def _markdown(task: str, results: dict) -> str:
    t = results["throughput"]
    lines = [f"# {task}", "", f"Checkpoint `{results['settings']['checkpoint']}`, data `{results['settings']['data']}`.",
             f"Throughput: {t['samples']} samples this run in {t['seconds']:.1f} s "
             f"({t['samples_per_s'] or 0:.3f} samples/s) on {t['device']}.", "",
             "| metric (×100) | mean [95 % interval] | n |", "|---|---|---|"]
    lines += [f"| {name} | {cell(s)} | {s['n']} |" for name, s in results["metrics"].items()]
    if results["failed"]:
        lines += ["", f"{results['failed']} samples failed (see `error` in results.json) and are left out."]
    if task in PAPER:
        lines += ["", f"Paper, Table 4 (X-VILA 7B): {PAPER[task]}."]
    return "\n".join(lines) + "\n"
