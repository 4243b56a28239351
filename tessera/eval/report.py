"""The demo report: task table, codec tables, training curves, generated digits and speech, stage times.

Writes `report.md` (for people) and `report.json` (for tools) into the demo directory, with the figures and
sound files beside them.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from PIL import Image

from tessera.data.digits import DIGIT_WORDS
from tessera.storage import atomic_write_json, atomic_write_text
from tessera.runtime.monitor import read_metrics


def plot_training_curves(run_dir: Path, path: Path) -> None:
    """One panel per modality: the training loss and, where the run evaluated, the held-out loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(run_dir)
    mods = [m for m in ("text", "image", "audio") if any(isinstance(r.get(f"loss_{m}"), (int, float)) for r in recs)]
    fig, axes = plt.subplots(1, max(1, len(mods)), figsize=(3.4 * max(1, len(mods)), 3.2), dpi=110, squeeze=False)
    for ax, m in zip(axes[0], mods):
        for key, style, label in ((f"loss_{m}", "-", "train"), (f"eval_loss_{m}", "o-", "held-out")):
            pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), style, label=label, markersize=3)
        ax.set_title(m)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("loss (nats / token)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def generalization_gap(run_dir: Path) -> list[str]:
    """Sentences comparing the last training loss with the last held-out loss of each modality."""
    recs = read_metrics(run_dir)
    lines = []
    for m in ("text", "image", "audio"):
        train = [r[f"loss_{m}"] for r in recs if isinstance(r.get(f"loss_{m}"), (int, float))]
        held = [r[f"eval_loss_{m}"] for r in recs if isinstance(r.get(f"eval_loss_{m}"), (int, float))]
        if not train or not held:
            continue
        tr = sum(train[-5:]) / len(train[-5:])  # the last few logged windows: one window is noisy
        gap = held[-1] - tr
        verdict = ("it generalizes: held-out loss is close to training loss" if gap < 0.25 * max(tr, 0.1) + 0.1 else
                   "it partly memorizes: held-out loss is clearly above training loss" if gap < tr + 0.5 else
                   "it memorizes: held-out loss is far above training loss, so what it learned does not transfer")
        lines.append(f"- **{m}**: training {tr:.2f}, held-out {held[-1]:.2f} nats/token (gap {gap:+.2f}); {verdict}.")
    return lines


def digit_grid(m, path: Path, seeds: int = 8, cfg_scale: float = 3.0, temperature: float = 1.0, top_k: int = 0,
               scale: int = 2) -> None:
    """One row per digit, `seeds` columns of "a drawing of the digit N"."""
    rows = []
    for d in range(10):
        prompts = [[f"a drawing of the digit {DIGIT_WORDS[d]}"]] * seeds
        outs = m.generate(prompts, output="image", cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                          seed=[1000 * d + s for s in range(seeds)])
        rows.append([o[0] for o in outs])
    w, h = rows[0][0].size
    pad = 2
    grid = Image.new("RGB", (seeds * (w + pad) + pad, 10 * (h + pad) + pad), (128, 128, 128))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST).save(path)


def speech_samples(m, out: Path, digits=(0, 3, 7), cfg_scale: float = 3.0, temperature: float = 1.0,
                   top_k: int = 0) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    names = []
    outs = m.generate([[f"say {DIGIT_WORDS[d]}"] for d in digits], output="audio", cfg_scale=cfg_scale,
                      temperature=temperature, top_k=top_k, seed=list(digits), max_audio_seconds=1.5)
    for d, o in zip(digits, outs):
        name = f"say_{DIGIT_WORDS[d]}.wav"
        o[0].save(out / name)
        names.append(name)
    return names


def _codec_table(title: str, ours: dict | None, classic_key: str, cols: list[tuple[str, str]]) -> list[str]:
    if not ours:
        return [f"### {title}", "", "(not evaluated)", ""]
    head = "| codec | " + " | ".join(c for c, _ in cols) + " |"
    lines = [f"### {title}", "", head, "|" + "---|" * (len(cols) + 1)]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}"
        if isinstance(v, list):
            return "[" + ", ".join(f"{x:.2f}" for x in v) + "]"
        return str(v)

    lines.append("| tessera | " + " | ".join(fmt(ours.get(k, "")) for _, k in cols) + " |")
    for row in ours.get(classic_key, []):
        label = f"{classic_key} q={row['quality']}" if "quality" in row else f"{classic_key} {row.get('kbps', row.get('bitrate', ''))}"
        lines.append(f"| {label} | " + " | ".join(fmt(row.get(k, "")) for _, k in cols) + " |")
    judge = ours.get("judge")
    kind = "clips" if classic_key == "opus" else "images"
    if judge:
        levels = f", decoding from {ours.get('n_q', '?')} level(s)" if classic_key == "opus" else ""
        lines += ["", f"The digit judge names {judge['accuracy_reconstructed']:.3f} of the reconstructed held-out "
                      f"{kind} correctly ({judge['accuracy_original']:.3f} of the originals){levels}: the ceiling of "
                      f"the generated {kind}' accuracy."]
    learn = ours.get("learnability")
    if learn:
        lines += ["", f"Learnability of the codes (nats/code, chance {learn['uniform']:.2f}): unigram entropy "
                      f"{learn['unigram_entropy']:.2f}; a small code prior trained for {learn['prior']['steps']} steps "
                      f"reaches {learn['prior_train_ce']:.2f} on training codes and {learn['prior_heldout_ce']:.2f} on "
                      f"held-out codes."]
    return lines + [""]


def write_report(out: Path, *, tasks: dict, image_eval: dict | None, audio_eval: dict | None, stages: dict,
                 total_seconds: float, targets: dict, run_dir: Path, config: dict, grid: str | None,
                 wavs: list[str], curves: str | None, instruct: dict | None = None,
                 trained: dict | None = None) -> dict:
    """The demo's report.md and report.json. `trained`: {stage: its trainer's train_summary.json} for the
    stages that train (the steps each took and which bound ended it)."""
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": __import__("os").cpu_count(), "torch": torch.__version__,
               "device": "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    report = {"tasks": tasks, "targets": targets, "image_codec": image_eval, "audio_codec": audio_eval,
              "stages": stages, "total_seconds": round(total_seconds, 1), "machine": machine, "config": config,
              "run": str(run_dir), "figures": {"grid": grid, "curves": curves}, "speech": wavs,
              "trained": {k: {"step": v["step"], "stopped_by": v.get("stopped_by")}
                          for k, v in (trained or {}).items()},
              **({"instruct_tasks": instruct} if instruct else {})}
    atomic_write_json(out / "report.json", report)
    md = ["# tessera demo report", "",
          f"Whole demo: **{total_seconds / 60:.1f} minutes** on {machine['cpus']} CPU(s), {machine['device']} "
          f"({machine['platform']}, torch {machine['torch']}).", "", "## Tasks (held-out data)", "",
          "| task | value | target | met | n | judge's own accuracy |", "|---|---|---|---|---|---|"]
    for task, r in tasks.items():
        if isinstance(r["value"], dict):
            val = ", ".join(f"{k} {v:.3g}" for k, v in r["value"].items())
            n = ", ".join(f"{k} {v}" for k, v in r["n"].items())
            md.append(f"| {task} (perplexity) | {val} | | | {n} | |")
            continue
        t = targets.get(task)
        met = "" if t is None else ("yes" if r["value"] >= t else "**no**")
        judge = f"{r['judge_acc']:.3f}" if r.get("judge_acc") is not None else ""
        md.append(f"| {task} | {r['value']:.3f} | {'' if t is None else f'>= {t}'} | {met} | {r['n']} | {judge} |")
    if instruct:
        md += ["", "## Stage two: instruction tuning", "",
               "The first stage's weights tuned on the corpus's conversations (`--init-from`), every task asked as "
               "a user's turn (`tessera eval --chat`).", "",
               "| task | one stage | two stages | target |", "|---|---|---|---|"]
        for task, r in instruct.items():
            if not isinstance(r["value"], dict) and task in tasks:
                t = targets.get(task)
                md.append(f"| {task} | {tasks[task]['value']:.3f} | {r['value']:.3f} | "
                          f"{'' if t is None else f'>= {t}'} |")
    md += ["", "## Tokenizers", ""]
    md += _codec_table("Image codec vs JPEG (held-out digit images)", image_eval, "jpeg",
                       [("PSNR dB", "psnr"), ("SSIM", "ssim"), ("bits/pixel", "bpp"), ("codebook usage", "codebook_usage")])
    md += _codec_table("Audio codec vs Opus (held-out voices)", audio_eval, "opus",
                       [("SI-SDR dB", "si_sdr"), ("mel distance", "mel_distance"), ("STOI", "stoi"), ("kbps", "kbps"),
                        ("codebook usage", "codebook_usage")])
    if curves:
        md += ["## Training", "", f"![training curves]({curves})", ""] + generalization_gap(run_dir) + [""]
    mem = {t: r["memorization"] for t, r in tasks.items() if isinstance(r, dict) and r.get("memorization")}
    if mem:
        md += ["## Memorization", "", "Each generated image against its nearest training image (16x16 gray, L2). "
               "A near-copy lies closer to a training image than 90% of held-out images lie to theirs.", "",
               "| task | near-copies | near-copies with the asked label | mean distance | held-out median |",
               "|---|---|---|---|---|"]
        for t, r in mem.items():
            agree = "" if r["near_copy_label_agreement"] is None else f"{r['near_copy_label_agreement']:.2f}"
            md.append(f"| {t} | {r['near_copy_share']:.2f} | {agree} | {r['mean_distance']:.2f} | "
                      f"{r['heldout_median_distance']:.2f} |")
        md.append("")
    if grid:
        md += ["## Generated digits", "", "One row per digit (0 at the top), one column per seed, prompt "
               "\"a drawing of the digit N\".", "", f"![generated digits]({grid})", ""]
    if wavs:
        md += ["## Generated speech", ""] + [f"- [{w}](speech/{w})" for w in wavs] + [""]
    trained = trained or {}
    md += ["## Stages", "", "| stage | seconds | reused | steps (ended by) |", "|---|---|---|---|"]
    for name, st in stages.items():
        t = trained.get(name)
        steps = f"{t['step']} ({str(t.get('stopped_by')).replace('_', ' ')})" if t else ""
        md.append(f"| {name} | {st['seconds']:.1f} | {'yes' if st.get('reused') else ''} | {steps} |")
    md += ["", f"Run directory: `{run_dir}`", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    return report

