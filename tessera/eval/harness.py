"""`tessera eval`: run task sets against a trained model and judge the outputs.

    tessera eval --model run/ --tasks digits [--data corpus/] [--json] [--out eval/]
    tessera eval --model run/ --tasks my_tasks.jsonl --data corpus/ --json

`digits` is the built-in set (tessera.eval.tasks.digits_tasks) over the corpus's held-out split, plus `ppl`,
the held-out loss per modality. Without --data, the corpus is found through the run: its training shards
record the documents file they were made from.

The JSON has one key per task; each holds `value` and `n` (and `judge_acc`, the judge's own accuracy on
real held-out data, for tasks judged by a classifier). For `ppl`, `value` is the perplexity per modality and
`loss` the mean loss in nats per token.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from tessera.errors import TesseraError
from tessera.eval.tasks import DigitsEvalConfig, TaskItem, digit_in_text, digits_tasks, load_tasks
from tessera.storage import atomic_write_json, read_json
from tessera.runtime.monitor import progress_bar
from tessera.unimodal.media import Audio, load_audio, load_image


class EvalError(TesseraError):
    pass


def find_corpus(run_dir: Path) -> Path:
    """The digits corpus a run was trained on: run config -> shards manifest -> documents.jsonl's folder."""
    cfg = read_json(run_dir / "config.json")
    data = cfg["data"]  # one shard set's directory, or a mixture's sets (train/mixture.py)
    for shards in [data] if isinstance(data, str) else [e["dir"] for e in data]:
        manifest = read_json(Path(shards) / "manifest.json")
        for inp in manifest.get("inputs", []):
            d = Path(inp["path"]).parent
            if (d / "meta.json").is_file():
                return d
    raise EvalError(f"cannot find the digits corpus of {run_dir}; pass --data CORPUS")


class Judges:
    """Builds each judge once, on first use; classifier judges are trained on real data only."""

    def __init__(self, corpus: Path | None):
        self.corpus = corpus
        self._cache: dict = {}
        self._memorization_refs: tuple | None = None  # training and held-out images, loaded on first use

    def get(self, name: str):
        if name not in self._cache:
            if name in ("image_digit", "speech_digit") and self.corpus is None:
                raise EvalError(f"judge {name} needs the digits corpus: pass --data CORPUS")
            if name == "image_digit":
                from tessera.eval.judges import ImageDigitJudge

                self._cache[name] = ImageDigitJudge.from_corpus(self.corpus)
            elif name == "speech_digit":
                from tessera.eval.judges import SpeechDigitJudge

                self._cache[name] = SpeechDigitJudge.from_corpus(self.corpus)
            elif name in ("text_digit", "text_match"):
                self._cache[name] = None
            else:
                raise EvalError(f"unknown judge {name!r}: text_digit, text_match, image_digit, speech_digit")
        return self._cache[name]

    def heldout_accuracy(self, name: str) -> float | None:
        """The judge's own accuracy on the corpus's real held-out data."""
        if name == "image_digit":
            return self.get(name).heldout_accuracy(self.corpus)
        if name == "speech_digit":
            from tessera.eval.judges import corpus_speech

            judge, pairs = self.get(name), corpus_speech(self.corpus, "test")
            waves = [load_audio(p, sample_rate=16000).waveform for p, _ in pairs]
            return judge.accuracy(waves, [label for _, label in pairs])
        return None

    def memorization(self, images: list, labels: list) -> dict:
        """Near-copies of training images among generated ones (tessera.eval.memorization)."""
        from tessera.eval.judges import corpus_images, corpus_split
        from tessera.eval.memorization import memorization_report

        if self._memorization_refs is None:
            train = corpus_split(self.corpus, "images", "train", augmented=True)  # every image training saw
            self._memorization_refs = ([load_image(p) for p, _ in train], [y for _, y in train],
                                       [load_image(p) for p, _ in corpus_images(self.corpus, "test")])
        tr, tr_labels, test = self._memorization_refs
        return memorization_report(images, labels, tr, tr_labels, test)

    def verdicts(self, name: str, outputs: list[list], labels: list) -> list[bool]:
        first = [next((s for s in out if not isinstance(s, str)), None) if name in ("image_digit", "speech_digit")
                 else "".join(s for s in out if isinstance(s, str)) for out in outputs]
        if name == "text_digit":
            return [digit_in_text(t) == int(y) for t, y in zip(first, labels)]
        if name == "text_match":
            return [str(y).lower() in t.lower() for t, y in zip(first, labels)]
        judge = self.get(name)
        ok = [x is not None for x in first]
        media = [x for x in first if x is not None]
        if not media:
            return [False] * len(first)
        if name == "image_digit":
            pred = iter(judge.predict(media))
        else:
            pred = iter(judge.predict([a.mono() for a in media], sample_rate=media[0].sample_rate))
        return [bool(k and next(pred) == int(y)) for k, y in zip(ok, labels)]


def _prompt(item: TaskItem, base: Path) -> list:
    segs = []
    for seg in item.prompt:
        if "text" in seg:
            segs.append(seg["text"])
        elif "image" in seg:
            segs.append(load_image(base / seg["image"]))
        else:
            segs.append(load_audio(base / seg["audio"]))
    return segs


def lead_text(m, prompts: list, max_new_tokens: int = 24) -> list[str]:
    """What the model writes first after each prompt, greedily: the text before it opens a span or ends."""
    outs = m.generate(prompts, output="any", temperature=0, max_new_tokens=max_new_tokens)
    lead = []
    for o in outs:
        words = []
        for seg in o:
            if not isinstance(seg, str):
                break
            words.append(seg)
        lead.append("".join(words).strip())
    return lead


def run_tasks(m, items: list[TaskItem], base: Path, judges: Judges, batch_size: int = 32, save_dir: Path | None = None,
              progress: bool = True, chat: bool = False) -> dict:
    """Generate for every item (in batches of items that share settings) and judge; returns per-task results.
    With `chat`, each prompt is a user's turn and the model answers as the assistant (`Tessera.chat_prompt`)."""
    groups: dict = defaultdict(list)
    for i, item in enumerate(items):
        kw = {k: v for k, v in item.generate.items() if k != "seed"}
        groups[(item.task, item.output, item.judge, json.dumps(kw, sort_keys=True), item.via)].append(i)
    verdicts: dict[str, list[bool]] = defaultdict(list)
    outputs: dict[int, list] = {}
    bar = progress_bar(total=len(items), desc="eval", unit="item", disable=not progress)
    for (task, output, judge, kw_json, via), idx in groups.items():
        kw = json.loads(kw_json)
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            prompts = [_prompt(items[i], base) for i in chunk]
            if chat:
                prompts = [m.chat_prompt([{"role": "user", "content": p}]) for p in prompts]
            seeds = [items[i].generate.get("seed", 0) for i in chunk]
            lead = lead_text(m, prompts) if via == "text" else [""] * len(chunk)
            prompts = [p + [t] if t else p for p, t in zip(prompts, lead)]
            outs = m.generate(prompts, output=output, seed=seeds, **kw)
            outs = [[t, *o] if t else o for t, o in zip(lead, outs)]
            verdicts[task] += judges.verdicts(judge, outs, [items[i].label for i in chunk])
            for i, o in zip(chunk, outs):
                outputs[i] = o
            bar.update(len(chunk))
    bar.close()
    results = {}
    for task, v in verdicts.items():
        judge = next(it.judge for it in items if it.task == task)
        r = {"value": float(np.mean(v)), "n": len(v)}
        acc = judges.heldout_accuracy(judge)
        if acc is not None:
            r["judge_acc"] = acc
        results[task] = r
    if save_dir is not None:
        save_outputs(items, outputs, save_dir)
    if judges.corpus is not None:
        for task in results:
            idx = [i for i, it in enumerate(items) if it.task == task and it.output == "image"]
            images = [next((s for s in outputs[i] if isinstance(s, Image.Image)), None) for i in idx]
            if idx and all(im is not None for im in images):
                results[task]["memorization"] = judges.memorization(images, [items[i].label for i in idx])
    return results


def save_outputs(items: list[TaskItem], outputs: dict[int, list], out: Path) -> None:
    """Every generated image and clip, and a JSONL of what each item produced."""
    media = out / "outputs"
    media.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, item in enumerate(items):
        rec = {"task": item.task, "label": item.label, "outputs": []}
        for j, seg in enumerate(outputs.get(i, [])):
            if isinstance(seg, str):
                rec["outputs"].append({"text": seg})
            elif isinstance(seg, Audio):
                name = f"{item.task}_{i:04d}_{j}.wav"
                seg.save(media / name)
                rec["outputs"].append({"audio": f"outputs/{name}"})
            else:
                name = f"{item.task}_{i:04d}_{j}.png"
                seg.save(media / name)
                rec["outputs"].append({"image": f"outputs/{name}"})
        lines.append(json.dumps(rec))
    (out / "outputs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def heldout_perplexity(m, run_dir: Path, corpus: Path, max_batches: int = 100) -> dict:
    """Held-out loss per modality on the corpus's test documents (pretokenized once into the run)."""
    import torch

    from tessera.runtime.distributed import DistEnv
    from tessera.train.pretokenize import PretokenizeConfig, pretokenize
    from tessera.train.losses import evaluate

    cfg = read_json(run_dir / "config.json")
    shards = Path(cfg["eval_data"]) if cfg.get("eval_data") else run_dir / "eval_shards"
    if not (shards / "manifest.json").exists() or not read_json(shards / "manifest.json").get("complete"):
        pretokenize(run_dir / "tokenizer", [corpus / "test_documents.jsonl"], shards,
                    PretokenizeConfig(workers=1), progress=False)
    env = DistEnv(device=m.device)
    r = evaluate(m.model, shards, m.tokenizer.layout, cfg["train"]["seq_len"], cfg["train"]["batch_size"],
                 max_batches, env, torch.float32)
    manifest = read_json(shards / "manifest.json")
    loss = {k.removeprefix("eval_loss_"): v for k, v in r.items() if k.startswith("eval_loss_")}
    return {"value": {k: math.exp(v) for k, v in loss.items()}, "loss": loss,
            "n": {k: manifest["tokens"].get(k, 0) for k in loss}}


def evaluate_run(run_dir: str | Path, tasks: str = "digits", data: str | Path | None = None, out: Path | None = None,
                 eval_cfg: DigitsEvalConfig | None = None, device=None, progress: bool = True, dtype=None,
                 chat: bool = False) -> dict:
    from tessera.model.api import load

    run_dir = Path(run_dir)
    m = load(run_dir, device=device, dtype=dtype)
    if tasks == "digits":
        corpus = Path(data) if data else find_corpus(run_dir)
        items, base = digits_tasks(corpus, eval_cfg), corpus
    else:
        items, base = load_tasks(tasks)
        corpus = Path(data) if data else None
    judges = Judges(corpus)
    results = run_tasks(m, items, base, judges, save_dir=out, progress=progress, chat=chat)
    if tasks == "digits":
        results["ppl"] = heldout_perplexity(m, run_dir, corpus)
    if out is not None:
        atomic_write_json(out / "eval.json", results)
    return results


def format_table(results: dict) -> str:
    lines = ["| task | value | n | judge's own accuracy |", "|---|---|---|---|"]
    for task, r in results.items():
        if task.startswith("_"):
            continue
        if isinstance(r["value"], dict):
            val = ", ".join(f"{k} {v:.3g}" for k, v in r["value"].items())
            n = ", ".join(f"{k} {v}" for k, v in r["n"].items())
        else:
            val, n = f"{r['value']:.3f}", str(r["n"])
        judge = f"{r['judge_acc']:.3f}" if r.get("judge_acc") is not None else ""
        lines.append(f"| {task} | {val} | {n} | {judge} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI
def add_eval_arguments(p) -> None:
    p.add_argument("--model", required=True, metavar="RUN")
    p.add_argument("--tasks", default="digits",
                   help="'digits' or a task JSONL file (its fields: docs/data.md, 'Task files')")
    p.add_argument("--data", metavar="CORPUS", help="the digits corpus (default: the one the run was trained on)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", metavar="DIR", help="save eval.json and every generated output here")
    p.add_argument("--draw-seeds", type=int, default=DigitsEvalConfig.draw_seeds)
    for kind in ("image", "audio"):
        for key, tp in (("temperature", float), ("top_k", int), ("cfg_scale", float)):
            name = f"{kind}_{key}"
            p.add_argument(f"--{name.replace('_', '-')}", type=tp, default=getattr(DigitsEvalConfig, name),
                           help=f"{key} when the digits tasks generate {kind}s")
    p.add_argument("--max-items", type=int, default=0, help="cap the per-clip/per-image tasks (0: all)")
    p.add_argument("--speech-to-image-via", choices=["auto", "text", "direct"], default="auto",
                   help="speech->image: write the transcript first (text), draw at once (direct), or as the corpus's "
                        "documents do (auto)")
    p.add_argument("--chat", action="store_true",
                   help="ask each task as a user's turn of a conversation (an instruction-tuned model)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "int8"],
                   help="the weights' precision (default: fp32 on CPU, bf16 on CUDA); int8: weight-only int8")


def run_eval(args) -> int:
    cfg = DigitsEvalConfig(draw_seeds=args.draw_seeds, max_items=args.max_items,
                           speech_to_image_via=args.speech_to_image_via,
                           **{f"{kind}_{key}": getattr(args, f"{kind}_{key}") for kind in ("image", "audio")
                              for key in ("temperature", "top_k", "cfg_scale")})
    out = Path(args.out) if args.out else None
    results = evaluate_run(args.model, args.tasks, args.data, out, cfg, device=args.device, progress=not args.json,
                           dtype=args.dtype, chat=args.chat)
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0
