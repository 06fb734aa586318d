"""python -m xvila.evaluation x2a --checkpoint C --data heldout.jsonl --out runs/x2a

The X²A benchmark (paper §3.1-3.2, Tables 2-3, Fig. 8): every conversation of a held-out
X-to-X manifest is replayed through the public chat API, round by round, in each decoding
mode on the same seed; each generated file is written under `DIR/outputs/` and scored
against the ground-truth file the manifest names. A sample is one conversation in one
mode (at one α); its score is the mean over its generated outputs (one per round).

Decoding modes: `text` Text-Aligned decoding (the decoder reads the reply's text), `ta`
(P_out(S_gen) conditions the decoder), `veh` (TA plus the visual embedding highway at rate
α; where the highway cannot apply - no visual input, or an audio output - the chat decodes
TA and the sample records variant "TA").

Writes `DIR/results.json`, `DIR/results.md` and, with several modes, `DIR/modes.png`;
with `--alpha-sweep`, the `veh` mode at each α on the samples with a visual input and a
visual output, `DIR/alpha_sweep.png`. Resumes from `DIR/samples.jsonl` after a kill.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from xvila.constants import TA, TA_VEH, TEXT_ALIGNED
from xvila.decoders.base import DecodeSettings
from xvila.errors import XVilaError
from xvila.evaluation import report
from xvila.evaluation.manifests import Conversation, read_x2x
from xvila.evaluation.records import SampleLog, Throughput, write_json, write_text
from xvila.evaluation.stats import EvaluationError, summary
from xvila.evaluation.x2a import Embedder

MODES = ("text", "ta", "veh")


@dataclass
class X2ASettings:
    modes: tuple[str, ...] = ("text", "ta", "veh")
    alpha: float | None = None  # VEH rate of the `veh` mode; None: the model's default
    alpha_sweep: tuple[float, ...] = ()  # non-empty: run `veh` at each of these instead
    limit: int | None = None
    steps: int | None = None  # denoising steps; None: the decoders' default
    frames: int | None = None  # video frames, fps and audio seconds to decode; None: the
    fps: float | None = None  # decoders' defaults (a small world's truths are shorter, and
    seconds: float | None = None  # X²A compares like with like)
    seed: int = 0
    temperature: float = 0.0  # greedy by default: the reply should not vary between runs
    max_new_tokens: int = 128
    batch_size: int = 8  # ImageBind batch for scoring
    root: str | None = None


def send_options(mode: str, alpha: float | None) -> dict:
    """`Chat.send` keywords of a decoding mode (the one place that maps modes to the API)."""
    if mode == "text":
        return {"decoding": TEXT_ALIGNED}
    if mode == "ta":
        return {"decoding": TA}
    if mode == "veh":
        return {"decoding": TA_VEH, "highway": True, "alpha": alpha}
    raise EvaluationError(f"unknown decoding mode {mode!r}; modes: {', '.join(MODES)}")


def _safe(name: str) -> str:
    tag = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:60]}-{tag}"


@dataclass(frozen=True)
class Job:
    conv: Conversation
    mode: str
    alpha: float | None

    def key(self, seed: int) -> str:
        alpha = "-" if self.alpha is None else f"{self.alpha:g}"
        return f"{self.conv.id}|{self.mode}|{alpha}|{seed}"

    def folder(self, out: Path) -> Path:
        alpha = "" if self.alpha is None else f"-a{self.alpha:g}"
        return out / "outputs" / _safe(self.conv.id) / f"{self.mode}{alpha}"


def plan(convs: list[Conversation], s: X2ASettings, default_alpha: float) -> list[Job]:
    if s.alpha_sweep:
        return [Job(c, "veh", a) for a in s.alpha_sweep for c in convs if c.visual_to_visual]
    for m in s.modes:
        send_options(m, None)  # unknown modes fail before anything runs
    alpha = default_alpha if s.alpha is None else s.alpha
    return [Job(c, m, alpha if m == "veh" else None) for m in s.modes for c in convs]


def run_job(model, job: Job, s: X2ASettings, out: Path) -> list[dict]:
    """Replay one conversation in one mode; the generated output of each round."""
    chat = model.new_chat(outputs_dir=job.folder(out))
    given = {"steps": s.steps, "frames": s.frames, "fps": s.fps, "seconds": s.seconds}
    decode = DecodeSettings(**{k: v for k, v in given.items() if v is not None})
    options = send_options(job.mode, job.alpha)
    results = []
    for r in job.conv.rounds:
        media = [e for e in chat.send(r.text, media=r.inputs, output=r.output or "text", seed=s.seed,
                                      temperature=s.temperature, max_new_tokens=s.max_new_tokens,
                                      decode=decode, **options)
                 if e.kind == "media"]
        if r.output is None:
            continue
        made = next((e for e in media if e.modality == r.output and e.path), None)
        results.append({"modality": r.output, "truth": r.truth,
                        "pred": made.path if made else None, "variant": made.variant if made else None})
    return results


def _record(job: Job, key: str, s: X2ASettings, outputs: list[dict], embedder: Embedder, out: Path,
            error: str | None = None) -> dict:
    pairs = [(o["pred"], o["truth"]) for o in outputs if o["pred"]]
    scores = iter(embedder.scores(pairs))
    files = []
    for o in outputs:
        score = next(scores) if o["pred"] else None
        pred = os.path.relpath(o["pred"], out) if o["pred"] else None
        files.append({"modality": o["modality"], "pred": pred, "truth": o["truth"], "score": score})
    scored = [f["score"] for f in files if f["score"] is not None]
    variants = sorted({o["variant"] for o in outputs if o["variant"]})
    return {"key": key, "id": job.conv.id, "type": job.conv.type, "mode": job.mode, "variant": "/".join(variants),
            "alpha": job.alpha, "seed": s.seed,
            "score": sum(scored) / len(scored) if scored and len(scored) == len(files) else None,
            "files": files, **({"error": error} if error else {})}


def summarise(records: list[dict]) -> list[dict]:
    """Per (type, mode, α): n, mean and 95 % interval of the sample scores (failed samples -
    an unreadable input, an output the model did not produce - are counted apart)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["type"], r["mode"], r["alpha"]), []).append(r)
    out = []
    for (t, mode, alpha), rs in groups.items():
        scores = [r["score"] for r in rs if r["score"] is not None]
        out.append({"type": t, "mode": mode, "alpha": alpha, **summary(scores), "failed": len(rs) - len(scores)})
    return out


def run_x2a(model, data: str, out: str, s: X2ASettings, checkpoint: str = "", progress: bool = True) -> dict:
    """Run (or resume) the benchmark into `out`; returns what results.json holds."""
    out_dir = Path(out)
    convs = read_x2x(data, s.root, s.limit)
    jobs = plan(convs, s, model.config.highway_alpha)
    if not jobs:
        raise EvaluationError(f"{data}: no conversation to run (an α sweep needs conversations with a visual "
                              "input and a visual output)")
    settings = {"task": "x2a", "checkpoint": checkpoint, "data": str(Path(data).resolve()), "root": s.root,
                "seed": s.seed, "steps": s.steps, "frames": s.frames, "fps": s.fps, "seconds": s.seconds,
                "temperature": s.temperature, "max_new_tokens": s.max_new_tokens}
    log = SampleLog(out_dir, settings)
    embedder = Embedder(model, s.batch_size)
    todo = [j for j in jobs if j.key(s.seed) not in log.done]
    # Ground truths first, in batches: each is encoded once, however many modes score it.
    truths = sorted({r.truth for j in todo for r in j.conv.rounds if r.truth})
    try:
        if truths:
            embedder.embed(truths)
    except XVilaError:
        pass  # a broken truth file fails its own samples below, with the reason recorded
    speed = Throughput(model.device)
    from tqdm.auto import tqdm

    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="sample", desc="X²A", disable=not progress,
              dynamic_ncols=True) as bar:
        for job in todo:
            try:
                record = _record(job, job.key(s.seed), s, run_job(model, job, s, out_dir), embedder, out_dir)
            except XVilaError as err:  # a broken input or truth file: recorded and counted, the run goes on
                record = _record(job, job.key(s.seed), s, [], embedder, out_dir, f"{type(err).__name__}: {err}")
            log.add(record)
            speed.tick()
            bar.update(1)
    print(speed.line())
    records = [log.done[j.key(s.seed)] for j in jobs]
    results = {"task": "x2a", "settings": {**settings, "modes": list(s.modes), "alpha": s.alpha,
                                           "alpha_sweep": list(s.alpha_sweep), "limit": s.limit},
               "throughput": speed.record(), "summary": summarise(records), "samples": records}
    _write_reports(out_dir, results, s, model.config.highway_alpha if s.alpha is None else s.alpha)
    return results


def _write_reports(out: Path, results: dict, s: X2ASettings, alpha: float) -> None:
    write_json(out / "results.json", results)
    summ, t = results["summary"], results["throughput"]
    lines = ["# X²A benchmark", "",
             f"Checkpoint `{results['settings']['checkpoint']}`, data `{results['settings']['data']}`, seed {s.seed}, "
             f"{'default' if s.steps is None else s.steps} denoising steps.",
             f"Throughput: {t['samples']} samples this run in {t['seconds']:.1f} s "
             f"({t['samples_per_s'] or 0:.3f} samples/s) on {t['device']}.", "",
             "Cells: mean X²A score (ImageBind cosine similarity ×100 between the generated file and the ground "
             "truth) [95 % bootstrap interval].", ""]
    if s.alpha_sweep:
        lines += ["## VEH conditioning rate α (paper Fig. 8 left/middle)", "", report.alpha_table(summ, list(s.alpha_sweep)),
                  "", report.counts_line(summ), "", "![alpha sweep](alpha_sweep.png)"]
        report.plot_alpha(summ, list(s.alpha_sweep), out / "alpha_sweep.png", "X²A score against the VEH rate α")
    else:
        lines += [f"## Decoding modes (paper Table 2/3, Fig. 8 right; TA+VEH at α = {alpha:g})", "",
                  report.modes_table(summ, list(s.modes)), "", report.counts_line(summ)]
        if len(s.modes) > 1:
            lines += ["", "![decoding modes](modes.png)"]
            report.plot_modes(summ, list(s.modes), out / "modes.png", "X²A score by decoding mode, same samples and seed")
    failed = sum(x["failed"] for x in summ)
    if failed:
        lines += ["", f"{failed} samples failed (see `error` in results.json) and are left out of the means."]
    lines += ["", "For reference (other data: the paper's ActivityNet set, the 7B model):", "", report.paper_table2(), ""]
    write_text(out / "results.md", "\n".join(lines))
