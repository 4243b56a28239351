"""`tessera demo`: the whole pipeline on the offline digits corpus, through the public commands.

    tessera demo [--out tessera-demo] [--fast] [--force]

Stages, each run as the command a user would type (`python -m tessera ...`), each timed:

    corpus       tessera data digits                       images, espeak-ng speech, text, documents
    text         tessera tokenizer train text              SentencePiece BPE, byte fallback
    image        tessera tokenizer train image             conv VQ codec (tiny preset)
    audio        tessera tokenizer train audio             SEANet + residual VQ codec (tiny preset)
    bundle       tessera tokenizer build                   one vocabulary for the three
    shards       tessera data pretokenize                  training and held-out documents
    pretrain     python -m tessera.train.pretrain          the decoder (demo preset)
    eval         tessera eval --tasks digits               independent judges on held-out data
    codec_eval   tessera tokenizer eval image|audio        next to JPEG and Opus
    report       report.md, report.json, figures, speech

A stage whose command and inputs are unchanged since it last finished is reused; `--force` redoes every
stage. A stage that was interrupted is run again (a training stage resumes from its last checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tessera.errors import TesseraError
from tessera.eval.tasks import ModalitySampling
from tessera.storage import atomic_write_json, read_json

TARGETS = {"caption_acc": 0.90, "draw_acc": 0.90, "transcribe_acc": 0.90, "speak_acc": 0.80,
           "speech_to_image_acc": 0.80}


class DemoError(TesseraError):
    pass


@dataclass
class DemoConfig(ModalitySampling):  # sampling for the eval and the report's samples
    fast: bool = False
    seed: int = 0  # the corpus's voices, speeds and pairings, the codecs' and the decoder's initialization
    text_vocab: int = 512
    # The corpus (tessera data digits): variety at no download cost, on the training split only.
    image_augment: int = 8
    speech_augment: int = 1
    speech_image_pairs: int = 2
    speech_image_transcript: bool = True  # clip, transcript, image: the model writes what it heard, then draws it
    # The codecs train for a number of steps (what an idle 2-core machine fits in 1.5 and 3.5 minutes), so
    # their quality does not move with the machine's load; the minutes are a cap (0 steps: the minutes alone).
    image_steps: int = 750
    image_minutes: float = 3.0
    # `--set` of the image codec (tiny preset): 64 codes, not the preset's 1,000 (see docs/generalization.md)
    image_overrides: list[str] = field(default_factory=lambda: ["fsq_levels=[4,4,4]"])
    audio_steps: int = 3700
    audio_minutes: float = 7.0
    # `--set` of the audio codec (tiny preset): one codebook of 256, not four of 1,024 (docs/generalization.md)
    audio_overrides: list[str] = field(default_factory=lambda: ["num_quantizers=1", "codebook_size=256"])
    audio_levels: int = 1  # residual levels of the audio codec that enter the vocabulary (see plan())
    pretrain_minutes: float = 5.5
    pretrain_preset: str = "demo"
    pretrain_overrides: list[str] = field(default_factory=lambda: [
        "model.dim=128", "model.dropout=0.1", "seq_len=256", "batch_size=8", "lr=3e-3", "warmup_steps=30",
        "cond_dropout=0.1", "keep_best=true", "eval_every=400", "eval_batches=20", "ckpt_every=400", "log_every=10"])
    # The held-out loss bottoms out at 800-1,200 steps in every measured run (docs/generalization.md): a
    # schedule that ends there anneals the weights that keep_best keeps. The time bound stays as a cap.
    pretrain_steps: int = 1400
    eval_max_items: int = 0
    draw_seeds: int = 10
    # A second training stage (0: none): instruction tuning on the corpus's conversations, starting from the
    # first stage's weights (`--init-from`), evaluated with every task asked as a user's turn (`eval --chat`)
    instruct_steps: int = 0
    instruct_overrides: list[str] = field(default_factory=lambda: [
        "seq_len=256", "batch_size=8", "lr=1e-3", "warmup_steps=10", "cond_dropout=0.1", "keep_best=true",
        "eval_every=100", "eval_batches=20", "ckpt_every=100", "log_every=10"])

    @classmethod
    def fast_config(cls) -> "DemoConfig":
        return cls(fast=True, text_vocab=320, image_steps=0, image_minutes=0.25, audio_steps=0, audio_minutes=0.3,
                   pretrain_minutes=0.75,
                   pretrain_steps=0, eval_max_items=20, draw_seeds=2, image_augment=1, speech_augment=0,
                   speech_image_pairs=1,
                   pretrain_overrides=["model.dim=128", "seq_len=256", "batch_size=8", "lr=3e-3", "warmup_steps=10",
                                       "cond_dropout=0.1", "eval_every=0", "ckpt_every=50", "log_every=5"])


@dataclass
class Stage:
    name: str
    argv: list[str]  # after `python -m`
    outputs: list[Path]  # removed before a fresh run
    deps: list[str]
    resumable: bool = False  # rerun an interrupted stage with --resume
    capture: Path | None = None  # write the command's stdout here (JSON results)


def _fingerprint(stage: Stage, done: dict) -> str:
    h = hashlib.sha256(json.dumps(stage.argv).encode())
    for d in stage.deps:
        h.update(done.get(d, {}).get("fingerprint", "").encode())
    return h.hexdigest()[:16]


def plan(out: Path, cfg: DemoConfig) -> list[Stage]:
    """The demo's stages. The choices that make the decoder generalize in 15 CPU minutes are measured in
    docs/generalization.md: codecs chosen for learnable codes (64 image codes on a 4x4 grid, one level of
    256 audio codes), a corpus with warped images and more voices and takes (used as inputs only, so
    generated digits and speech follow the real ones), residual dropout, the held-out-best weights, and
    sampling per output modality. The decoder is the `demo` preset at width 128 (the output layer over the
    vocabulary is then half its cost, so it takes about twice the steps of width 256 in the same time);
    batches of 8 x 256 tokens beat 16 x 256 in the same minutes."""
    py = ["tessera"]
    c, t = out / "corpus", out / "tokenizers"
    bound = lambda n, minutes: ["--max-minutes", str(minutes)] + (["--max-steps", str(n)] if n else [])
    train = [*py, "data", "digits", "--out", str(c), "--seed", str(cfg.seed), "--image-augment", str(cfg.image_augment),
             "--speech-augment", str(cfg.speech_augment), "--speech-image-pairs", str(cfg.speech_image_pairs),
             "--speech-image-transcript" if cfg.speech_image_transcript else "--no-speech-image-transcript"] + (
        ["--fast"] if cfg.fast else [])
    sets = lambda overrides: [a for o in [f"seed={cfg.seed}", *overrides] for a in ("--set", o)]
    return [
        Stage("corpus", train, [c], []),
        Stage("text", [*py, "tokenizer", "train", "text", "--input", str(c / "text.txt"), "--vocab-size",
                       str(cfg.text_vocab), "--out", str(t / "text")], [t / "text"], ["corpus"]),
        Stage("image", [*py, "tokenizer", "train", "image", "--data", str(c / "images" / "train"), "--eval-data",
                        str(c / "images" / "test"), "--out", str(t / "image"), "--preset", "tiny",
                        *bound(cfg.image_steps, cfg.image_minutes), *sets(cfg.image_overrides)], [t / "image"],
              ["corpus"], resumable=True),
        Stage("audio", [*py, "tokenizer", "train", "audio", "--data", str(c / "speech" / "train"), "--eval-data",
                        str(c / "speech" / "test"), "--out", str(t / "audio"), "--preset", "tiny",
                        *bound(cfg.audio_steps, cfg.audio_minutes), *sets(cfg.audio_overrides)], [t / "audio"],
              ["corpus"], resumable=True),
        Stage("bundle", [*py, "tokenizer", "build", "--text", str(t / "text"), "--image", str(t / "image"),
                         "--audio", str(t / "audio"), "--out", str(t / "bundle"), "--max-grid", "16",
                         "--audio-levels", str(cfg.audio_levels), "--force"],
              [t / "bundle"], ["text", "image", "audio"]),
        Stage("shards", [*py, "data", "pretokenize", "--tokenizer", str(t / "bundle"), "--input",
                         str(c / "documents.jsonl"), "--out", str(out / "shards" / "train"), "--workers", "2"],
              [out / "shards" / "train"], ["bundle"]),
        Stage("test_shards", [*py, "data", "pretokenize", "--tokenizer", str(t / "bundle"), "--input",
                              str(c / "test_documents.jsonl"), "--out", str(out / "shards" / "test"), "--workers", "1"],
              [out / "shards" / "test"], ["bundle"]),
        Stage("pretrain", ["tessera.train.pretrain", "--preset", cfg.pretrain_preset, "--tokenizer", str(t / "bundle"),
                           "--data", str(out / "shards" / "train"), "--eval-data", str(out / "shards" / "test"),
                           "--out", str(out / "run"), *bound(cfg.pretrain_steps, cfg.pretrain_minutes)]
              + sets(cfg.pretrain_overrides),
              [out / "run"], ["shards", "test_shards"], resumable=True),
        Stage("eval", [*py, "eval", "--model", str(out / "run"), "--tasks", "digits", "--data", str(c), "--json",
                       "--out", str(out / "eval"), *eval_args(cfg)],
              [out / "eval"], ["pretrain"], capture=out / "eval.json"),
        *instruct_stages(out, cfg, py, sets),
        Stage("image_eval", [*py, "tokenizer", "eval", "image", "--codec", str(t / "image"), "--data",
                             str(c / "images" / "test"), "--prior-data", str(c / "images" / "train"),
                             "--digits-corpus", str(c), "--json"], [], ["image"],
              capture=out / "image_codec_eval.json"),
        Stage("audio_eval", [*py, "tokenizer", "eval", "audio", "--codec", str(t / "audio"), "--data",
                             str(c / "speech" / "test"), "--n-q", str(cfg.audio_levels), "--digits-corpus", str(c),
                             "--prior-data", str(c / "speech" / "train"), "--json"], [], ["audio"],
              capture=out / "audio_codec_eval.json"),
    ]


def eval_args(cfg: DemoConfig) -> list[str]:
    """`tessera eval`'s task settings, the same for both stages."""
    return ["--draw-seeds", str(cfg.draw_seeds), "--max-items", str(cfg.eval_max_items)] + [
        a for kind in ("image", "audio") for k, v in cfg.sampling(kind).items()
        for a in (f"--{kind}-{k.replace('_', '-')}", str(v))]


def instruct_stages(out: Path, cfg: DemoConfig, py: list[str], sets) -> list[Stage]:
    """Stage two, instruction tuning (with `instruct_steps`): the conversations pretokenized with the same
    bundle, a run that starts from stage one's weights with a new optimizer and schedule, and the tasks
    asked as conversations."""
    if not cfg.instruct_steps:
        return []
    c, t = out / "corpus", out / "tokenizers"
    shards = lambda name, split: Stage(
        name, [*py, "data", "pretokenize", "--tokenizer", str(t / "bundle"), "--input", str(c / f"{split}.jsonl"),
               "--out", str(out / "shards" / split), "--workers", "1"], [out / "shards" / split], ["bundle"])
    return [
        shards("chat_shards", "conversations"),
        shards("test_chat_shards", "test_conversations"),
        Stage("instruct", ["tessera.train.pretrain", "--tokenizer", str(t / "bundle"), "--init-from", str(out / "run"),
                           "--data", str(out / "shards" / "conversations"), "--eval-data",
                           str(out / "shards" / "test_conversations"), "--out", str(out / "instruct"),
                           "--max-steps", str(cfg.instruct_steps)] + sets(cfg.instruct_overrides),
              [out / "instruct"], ["pretrain", "chat_shards", "test_chat_shards"], resumable=True),
        Stage("instruct_eval", [*py, "eval", "--model", str(out / "instruct"), "--tasks", "digits", "--data", str(c),
                                "--json", "--chat", "--out", str(out / "instruct_eval"), *eval_args(cfg)],
              [out / "instruct_eval"], ["instruct"], capture=out / "instruct_eval.json"),
    ]


def run_stage(stage: Stage, state: dict, out: Path, force: bool, index: int, total: int) -> dict:
    fp = _fingerprint(stage, state)
    prev = state.get(stage.name, {})
    outputs_ok = all(p.exists() for p in stage.outputs) and (stage.capture is None or stage.capture.exists())
    if prev.get("done") and prev.get("fingerprint") == fp and outputs_ok and not force:
        print(f"[{index}/{total}] {stage.name}: reused ({prev.get('seconds', 0):.0f}s when it ran)", flush=True)
        return {**prev, "reused": True}
    argv = list(stage.argv)
    resume = stage.resumable and prev.get("fingerprint") == fp and not prev.get("done") and not force and \
        any((p / "checkpoints" / "latest").exists() for p in stage.outputs)
    if resume:
        argv.append("--resume")
    else:
        for p in stage.outputs:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    state[stage.name] = {"fingerprint": fp, "done": False}
    atomic_write_json(out / "stages.json", state)
    cmd = [sys.executable, "-m", *argv]
    print(f"[{index}/{total}] {stage.name}: {' '.join(['python', '-m', *argv])}", flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if stage.capture is not None:
        r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        if r.returncode == 0:
            try:
                json.loads(r.stdout)
            except json.JSONDecodeError:
                raise DemoError(f"stage {stage.name} printed no JSON: {r.stdout[-500:]}") from None
            stage.capture.write_text(r.stdout, encoding="utf-8")
    else:
        r = subprocess.run(cmd, env=env)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise DemoError(f"stage {stage.name} failed (exit status {r.returncode}); rerun `tessera demo` to retry it "
                        "(finished stages are reused)")
    print(f"[{index}/{total}] {stage.name}: done in {seconds:.0f}s", flush=True)
    return {"fingerprint": fp, "done": True, "seconds": round(seconds, 1), "resumed": resume}


def run_pipeline(out: str | Path = "tessera-demo", cfg: DemoConfig | None = None, force: bool = False) -> dict:
    from tessera.data.digits import check_espeak

    cfg = cfg or DemoConfig()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check_espeak()  # fail before any work, with the install command, rather than lose the speech half
    state_path = out / "stages.json"
    state = read_json(state_path) if state_path.exists() and not force else {}
    stages = plan(out, cfg)
    times = {}
    total = len(stages) + 1
    for i, st in enumerate(stages, 1):
        state[st.name] = run_stage(st, state, out, force, i, total)
        times[st.name] = {"seconds": state[st.name]["seconds"], "reused": state[st.name].pop("reused", False)}
        atomic_write_json(state_path, state)
    print(f"[{total}/{total}] report", flush=True)
    t0 = time.perf_counter()
    make_figures(out, cfg)
    times["report"] = {"seconds": round(time.perf_counter() - t0, 1), "reused": False}
    total_s = sum(s["seconds"] for s in times.values() if not s["reused"])
    report = write_demo_report(out, cfg, times, total_s)
    print_summary(report, out)
    return report


def make_figures(out: Path, cfg: DemoConfig) -> None:
    from tessera.eval.report import digit_grid, plot_training_curves, speech_samples
    from tessera.model.api import load

    m = load(out / "run")
    plot_training_curves(out / "run", out / "training_curves.png")
    digit_grid(m, out / "generated_digits.png", seeds=8, **cfg.sampling("image"))
    speech_samples(m, out / "speech", digits=(0, 3, 7), **cfg.sampling("audio"))


def write_demo_report(out: Path, cfg: DemoConfig, times: dict, total_s: float) -> dict:
    from tessera.eval.report import write_report

    tasks = read_json(out / "eval.json")
    img = read_json(out / "image_codec_eval.json") if (out / "image_codec_eval.json").exists() else None
    aud = read_json(out / "audio_codec_eval.json") if (out / "audio_codec_eval.json").exists() else None
    wavs = sorted(p.name for p in (out / "speech").glob("*.wav"))
    instruct = read_json(out / "instruct_eval.json") if cfg.instruct_steps else None
    t = out / "tokenizers"
    summaries = {"image": t / "image", "audio": t / "audio", "pretrain": out / "run", "instruct": out / "instruct"}
    trained = {k: read_json(d / "train_summary.json") for k, d in summaries.items()
               if k in times and (d / "train_summary.json").exists()}
    return write_report(out, tasks=tasks, image_eval=img, audio_eval=aud, stages=times, total_seconds=total_s,
                        targets=TARGETS, run_dir=out / "run", config=asdict(cfg), grid="generated_digits.png",
                        wavs=wavs, curves="training_curves.png", instruct=instruct, trained=trained)


def print_summary(report: dict, out: Path) -> None:
    print("\n" + "=" * 72)
    print(f"tessera demo finished in {report['total_seconds'] / 60:.1f} min (stages run this time)")
    for task, r in report["tasks"].items():
        if isinstance(r["value"], dict):
            print(f"  {task:<22} " + ", ".join(f"{k} {v:.3g}" for k, v in r["value"].items()))
        else:
            t = report["targets"].get(task)
            flag = "" if t is None else ("  (target >= %.2f: %s)" % (t, "met" if r["value"] >= t else "MISSED"))
            print(f"  {task:<22} {r['value']:.3f}  n={r['n']}{flag}")
    for task, r in report.get("instruct_tasks", {}).items():
        if not isinstance(r["value"], dict):
            print(f"  {task:<22} {r['value']:.3f}  after instruction tuning (tasks asked as conversations)")
    print(f"report: {out / 'report.md'}")


# ------------------------------------------------------------------------------------------------ CLI
def add_demo_arguments(p) -> None:
    p.add_argument("--out", default="tessera-demo", help="demo directory (default: ./tessera-demo)")
    p.add_argument("--fast", action="store_true", help="a cut-down demo (a few minutes; for tests)")
    p.add_argument("--seed", type=int, default=None, help="seed of the corpus, the codecs and the decoder (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a demo setting (see tessera.eval.demo.DemoConfig), e.g. pretrain_minutes=8")
    p.add_argument("--force", action="store_true", help="redo every stage")


def run_demo(args) -> int:
    from tessera.config import apply_overrides

    cfg = apply_overrides(DemoConfig.fast_config() if args.fast else DemoConfig(), args.set)
    if args.seed is not None:
        cfg.seed = args.seed
    run_pipeline(args.out, cfg, force=args.force)
    return 0
