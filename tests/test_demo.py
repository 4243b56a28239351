"""`tessera demo --fast` end to end, through the console script, on CPU: every stage runs, the report is
complete, and a second run reuses every finished stage."""

import json
import shutil
import subprocess
import sys

import pytest
import soundfile as sf
from PIL import Image

TASK_KEYS = {"caption_acc", "draw_acc", "transcribe_acc", "speak_acc", "speech_to_image_acc", "ppl"}
STAGES = ["corpus", "text", "image", "audio", "bundle", "shards", "test_shards", "pretrain", "eval", "image_eval",
          "audio_eval", "report"]


def test_the_trainers_are_bounded_by_steps_with_the_minutes_as_a_cap(tmp_path):
    from tessera.eval.demo import DemoConfig, plan

    def bounds(cfg):
        out = {}
        for st in plan(tmp_path, cfg):
            a = st.argv
            if "--max-minutes" in a:
                out[st.name] = (float(a[a.index("--max-minutes") + 1]),
                                int(a[a.index("--max-steps") + 1]) if "--max-steps" in a else None)
        return out

    cfg = DemoConfig()
    assert bounds(cfg) == {"image": (cfg.image_minutes, cfg.image_steps), "audio": (cfg.audio_minutes, cfg.audio_steps),
                           "pretrain": (cfg.pretrain_minutes, cfg.pretrain_steps)}
    assert all(steps for _, steps in bounds(cfg).values())
    assert bounds(DemoConfig(image_steps=0))["image"] == (cfg.image_minutes, None)  # 0 steps: the minutes alone
    assert bounds(DemoConfig.fast_config()) == {"image": (0.25, None), "audio": (0.3, None), "pretrain": (0.75, None)}


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="the demo needs espeak-ng (scripts/setup.sh installs it)")
def test_fast_demo_runs_end_to_end_and_reuses_finished_stages(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "tessera", "demo", "--fast", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["tasks"]) == TASK_KEYS
    for task in TASK_KEYS - {"ppl"}:
        assert 0.0 <= report["tasks"][task]["value"] <= 1.0 and report["tasks"][task]["n"] > 0
    assert set(report["tasks"]["ppl"]["value"]) == {"text", "image", "audio"}
    assert list(report["stages"]) == STAGES and all(s["seconds"] >= 0 for s in report["stages"].values())
    assert report["total_seconds"] > 0
    assert report["image_codec"]["jpeg"] and report["audio_codec"]["opus"]
    for codec in ("image_codec", "audio_codec"):  # the judges' ceilings and the codes' learnability
        assert 0.0 <= report[codec]["judge"]["accuracy_reconstructed"] <= 1.0
        learn = report[codec]["learnability"]
        assert 0.0 < learn["prior_heldout_ce"] and learn["unigram_entropy"] <= learn["uniform"] + 1e-6
    assert "memorization" in report["tasks"]["draw_acc"]
    # the trainers' steps and the bound that ended each (the cut-down demo bounds them by minutes only)
    assert set(report["trained"]) == {"image", "audio", "pretrain"}
    assert all(t["step"] > 0 and t["stopped_by"] == "max_minutes" for t in report["trained"].values())
    md = (out / "report.md").read_text()
    assert f"| pretrain | {report['stages']['pretrain']['seconds']:.1f} |  | {report['trained']['pretrain']['step']} " \
           "(max minutes) |" in md
    for needle in ("caption_acc", "JPEG", "Opus", "training_curves.png", "generated_digits.png", "Whole demo",
                   "Learnability", "Memorization"):
        assert needle in md, needle
    grid = Image.open(out / "generated_digits.png")
    assert grid.width > grid.height / 10 and grid.height >= 10 * 16  # one row per digit
    Image.open(out / "training_curves.png").verify()
    wavs = sorted((out / "speech").glob("*.wav"))
    assert len(wavs) == len(report["speech"]) >= 3
    for w in wavs:
        data, sr = sf.read(w)
        assert sr == 16000 and len(data) > 0
    # a second run reuses every finished stage
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count(": reused (") == len(STAGES) - 1


@pytest.mark.slow
def test_two_stage_recipe_instruction_tunes_the_demo_model(tmp_path):
    """Stage one (the demo's mixture), then stage two on the corpus's conversations from stage one's weights,
    evaluated with every task asked as a conversation (docs/stages.md)."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "tessera", "demo", "--fast", "--out", str(out), "--set", "instruct_steps=60"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["instruct_tasks"]) == TASK_KEYS and "Stage two" in (out / "report.md").read_text()
    cfg = json.loads((out / "instruct" / "config.json").read_text())
    assert cfg["init_from"]["path"].endswith("run")
    from tessera.runtime.monitor import read_metrics

    losses = [m["loss"] for m in read_metrics(out / "instruct") if "loss" in m]
    assert len(losses) >= 3 and losses[-1] < losses[0]  # the conversations' loss falls from stage one's
