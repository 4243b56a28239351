"""Generation speed: tessera's decoding loop next to HF `generate` on the same exported weights, in one run.

For each preset: a randomly initialized decoder over a demo-sized vocabulary (text 384 + image 1000 + audio
4 x 1024), exported to transformers; batch 1, greedy, 256 new tokens (end-of-text disabled on both sides so
every run decodes exactly 256), text-only vocabulary mask on both sides (tessera's constrained decoder, an
equivalent LogitsProcessor for HF). The greedy ids must be identical. Runs alternate and the median of
`--rounds` is reported, with the ratio. It also times image generation with classifier-free guidance
(seconds per image): the demo's 4x4-code digit and a 16x16-code (256-token) image.

Each preset also gets a floor: the time of the decode step's matrix-vector products alone (every weight
matrix once, as one token reads them), the memory-bound limit of any fp32 decoder at batch 1 on this
machine. `floor_tokens_per_s / hf_tokens_per_s` is the largest ratio an exact fp32 decoder could reach.
`--compile` adds tessera with its decode step compiled (`Tessera.compile()`; the compile time is reported
apart and not counted).

Draft-free speculative rows (every preset, `--lookup-k`): the same greedy decode with prompt lookup and with
Jacobi iteration (`PromptLookup`, `PromptLookup(jacobi=True)`) at `k` guesses a round, next to HF's own prompt
lookup (`prompt_lookup_num_tokens=k`), with acceptance rates and the identical-id check; and the two images
decoded greedily, plain against both (the same ids for a seed required).

Low-memory rows (every preset): the same greedy decode with bf16 weights and with weight-only int8 Linear
layers (`tessera.load(run, dtype="bf16"|"int8")`), with the fraction of the 256 greedy ids that match fp32's.

Speculative rows (`--model-run RUN --draft-run DRAFT`, trained runs over one bundle): seconds per generation
of the demo's tasks (draw: an image with CFG 3; speak: up to 1.5 s of audio with CFG 3; text: 48 tokens of
text), plain decoding against speculative decoding with `k` draft tokens, greedy (ids must be identical) and
sampled as the eval samples (draw at temperature 0.5, speak at 0.3), with the acceptance rate; and the same
tasks with bf16 and int8 weights (plain decoding), and draft-free prompt lookup and Jacobi iteration
(`draft="lookup"`, `draft="jacobi"`).

    python benchmarks/generate_throughput.py [--presets demo,small] [--new-tokens 256] [--compile] [--lookup-k 4,8,16]
    python benchmarks/generate_throughput.py --presets '' --model-run run/ --draft-run draft/ [--draft-k 2,4]
    python benchmarks/generate_throughput.py --gpu-1b        # CUDA: also 1b, seconds per 256-token image

Writes benchmarks/results/generate_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import machine, write_result

RESULTS = Path(__file__).parent / "results" / "generate_throughput.json"


def demo_bundle(root: Path) -> Path:
    """A bundle of the demo's shape: a small text model and untrained tiny codecs."""
    from tessera.data.digits import CAPTIONS, DIGIT_WORDS, DRAW_PROMPTS
    from tessera.tokenizers import build_bundle
    from tessera.unimodal.audio import AudioCodec, SEANetCodec, audio_codec_config
    from tessera.unimodal.image import ImageCodec, image_preset
    from tessera.unimodal.text import TextTrainConfig, train_text_tokenizer

    lines = [t.format(w=w, d=d) for t in CAPTIONS + DRAW_PROMPTS for d, w in enumerate(DIGIT_WORDS)] * 20
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    train_text_tokenizer([root / "text.txt"], root / "text", TextTrainConfig(vocab_size=384), progress=False)
    torch.manual_seed(0)
    ImageCodec(image_preset("tiny")).save(root / "image")
    audio = SEANetCodec(audio_codec_config("tiny"))
    audio.train()
    audio.quantizer.set_dropout(False)
    with torch.no_grad():
        audio(0.1 * torch.randn(2, 1, 16000))
    AudioCodec.save_model(audio, root / "audio")
    build_bundle(root / "bundle", root / "text", root / "image", root / "audio", max_grid=16)
    return root / "bundle"


def bench(preset: str, bundle: Path, new_tokens: int, rounds: int, device, compile_step: bool = False,
          images: bool = True, lookup_k: tuple[int, ...] = ()) -> dict:
    from transformers import LogitsProcessor, LogitsProcessorList

    from tessera.model.api import random_model
    from tessera.model.constrained import TEXT, FSMConfig, SpanFSM
    from tessera.model.generate import GenerationConfig, decode
    from tessera.model.hf_export import to_hf_model
    from tessera.model.speculative import PromptLookup, speculative_decode
    from tessera.tokenizers import load_bundle

    tok = load_bundle(bundle, device=device)
    m = random_model(tok, preset, seed=0, qk_norm=False)
    m.model.to(device).eval()
    m.device = torch.device(device)
    hf = to_hf_model(m.model.cpu(), tok.bos_id, None, tok.pad_id).to(device).eval()
    m.model.to(device)
    L = tok.layout
    # end-of-text disabled: an FSM whose end token is <pad>, which text can never produce
    fsm = SpanFSM(L, eos_id=L.pad, device=device)
    allowed = fsm.rows[fsm.R_TEXT]
    prompt = tok.encode(["a drawing of the digit seven"], bos=True)

    class TextOnly(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.masked_fill(~allowed, float("-inf"))

    ids = torch.tensor([prompt], device=device)
    greedy = GenerationConfig(max_new_tokens=new_tokens, temperature=0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def ours(compiled=False):
        steps = decode(m.model, [prompt], fsm, FSMConfig(), greedy, start_state=TEXT, pad_id=L.pad,
                       step_fn=m._step_fn if compiled else None, static_cache=compiled)
        return torch.stack(list(steps), 1)[0].tolist()

    def theirs():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=L.pad,
                              logits_processor=LogitsProcessorList([TextOnly()]))
        return out[0, len(prompt):].tolist()

    def timed(fn):
        sync()
        t = time.perf_counter()
        r = fn()
        sync()
        return time.perf_counter() - t, r

    weights = [mod.weight for mod in m.model.modules() if isinstance(mod, torch.nn.Linear)]
    vecs = [torch.randn(1, 1, w.shape[1], device=device, dtype=w.dtype) for w in weights]

    def floor():  # one token's matrix-vector products, nothing else
        with torch.no_grad():
            for _ in range(new_tokens):
                for w, x in zip(weights, vecs):
                    torch.nn.functional.linear(x, w)

    a_out, b_out = ours(), theirs()  # warm-up, and the identity check
    timed(floor)
    a, b, f = [], [], []
    for _ in range(rounds):
        a.append(timed(ours)[0])
        b.append(timed(theirs)[0])
        f.append(timed(floor)[0])
    res = {"preset": preset, "params": m.model.num_params(False), "new_tokens": new_tokens,
           "tessera_tokens_per_s": round(new_tokens / statistics.median(a), 1),
           "hf_tokens_per_s": round(new_tokens / statistics.median(b), 1),
           "floor_tokens_per_s": round(new_tokens / statistics.median(f), 1),
           "identical_greedy_ids": a_out == b_out}
    res["ratio"] = round(res["tessera_tokens_per_s"] / res["hf_tokens_per_s"], 3)
    res["floor_ratio"] = round(res["floor_tokens_per_s"] / res["hf_tokens_per_s"], 3)
    for k in lookup_k:  # draft-free speculative decoding: prompt lookup and Jacobi, exact (identical greedy ids)
        def spec(jacobi, stats, k=k):
            cfg = GenerationConfig(max_new_tokens=new_tokens, temperature=0, draft_tokens=k)
            steps = speculative_decode(m.model, PromptLookup(jacobi=jacobi), [prompt], fsm, FSMConfig(), cfg,
                                       start_state=TEXT, pad_id=L.pad, stats=stats)
            return torch.stack(list(steps), 1)[0].tolist()

        def hf_lookup(k=k):  # HF's own prompt lookup (`prompt_lookup_num_tokens`), for the comparison's honesty
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=L.pad,
                                  logits_processor=LogitsProcessorList([TextOnly()]), prompt_lookup_num_tokens=k)
            return out[0, len(prompt):].tolist()

        stats = {"lookup": {}, "jacobi": {}}
        fns = {"lookup": lambda st=stats: spec(False, st["lookup"]),
               "jacobi": lambda st=stats: spec(True, st["jacobi"]), "hf_lookup": hf_lookup}
        outs = {name: fn() for name, fn in fns.items()}
        times = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                times[name].append(timed(fn)[0])
        for name in fns:
            res[f"{'' if name == 'hf_lookup' else 'tessera_'}{name}_k{k}_tokens_per_s"] = round(
                new_tokens / statistics.median(times[name]), 1)
            res[f"{name}_k{k}_identical_greedy_ids"] = outs[name] == b_out
        for name in ("lookup", "jacobi"):
            tps = res[f"tessera_{name}_k{k}_tokens_per_s"]
            res[f"{name}_k{k}_ratio"] = round(tps / res["hf_tokens_per_s"], 3)
            res[f"{name}_k{k}_ratio_vs_hf_lookup"] = round(tps / res[f"hf_lookup_k{k}_tokens_per_s"], 3)
            res[f"{name}_k{k}_acceptance"] = round(stats[name]["accepted"] / max(1, stats[name]["drafted"]), 3)
    res["distinct_tokens_in_greedy_output"] = len(set(a_out))  # how repetitive the text is (lookup's acceptance)
    if compile_step:
        t = time.perf_counter()
        m.compile()
        c_out = ours(compiled=True)
        res["compile_seconds"] = round(time.perf_counter() - t, 1)
        c = [timed(lambda: ours(compiled=True))[0] for _ in range(rounds)]
        res["tessera_compiled_tokens_per_s"] = round(new_tokens / statistics.median(c), 1)
        res["compiled_ratio"] = round(res["tessera_compiled_tokens_per_s"] / res["hf_tokens_per_s"], 3)
        res["compiled_identical_greedy_ids"] = c_out == b_out
        m._step_fn = None
    low = {}
    for name in ("bf16", "int8"):
        import copy

        from tessera.model.quant import quantize_int8

        lm = copy.deepcopy(m.model)
        lm = lm.to(torch.bfloat16) if name == "bf16" else quantize_int8(lm)
        low[name] = lm
    for name, lm in low.items():
        def run_low(lm=lm):
            steps = decode(lm, [prompt], fsm, FSMConfig(), greedy, start_state=TEXT, pad_id=L.pad)
            return torch.stack(list(steps), 1)[0].tolist()

        low_out = run_low()
        times = [timed(run_low)[0] for _ in range(rounds)]
        res[f"tessera_{name}_tokens_per_s"] = round(new_tokens / statistics.median(times), 1)
        res[f"{name}_ratio"] = round(res[f"tessera_{name}_tokens_per_s"] / res["hf_tokens_per_s"], 3)
        res[f"{name}_vs_fp32"] = round(res[f"tessera_{name}_tokens_per_s"] / res["tessera_tokens_per_s"], 3)
        res[f"{name}_greedy_ids_matching_fp32"] = round(sum(x == y for x, y in zip(low_out, a_out)) / new_tokens, 3)
    for name_, size in (("demo_image_4x4", None), ("image_16x16", (128, 128))) if images else ():
        m.generate("a drawing of the digit seven", output="image", cfg_scale=3.0, seed=0, image_size=size)
        times = [timed(lambda: m.generate("a drawing of the digit seven", output="image", cfg_scale=3.0, seed=s,
                                          image_size=size))[0] for s in range(rounds)]
        res[f"seconds_per_{name_}_cfg"] = round(statistics.median(times), 4)
        for k in lookup_k:  # the same images with draft-free speculation (exact: the same ids for a seed)
            gen = lambda s, d: m.generate_ids("a drawing of the digit seven", output="image", cfg_scale=3.0,  # noqa: E731
                                              seed=s, image_size=size, temperature=0, **d)[0]
            plain_ids = [gen(s, {}) for s in range(rounds)]
            variants = {name: {"draft": name, "draft_tokens": k} for name in ("lookup", "jacobi")}
            times = {name: [] for name in ["plain", *variants]}
            same = {name: True for name in variants}
            counts = {name: [0, 0] for name in variants}
            for s in range(rounds):
                times["plain"].append(timed(lambda: gen(s, {}))[0])
                for name, spec_kw in variants.items():
                    dt, got = timed(lambda s=s, spec_kw=spec_kw: gen(s, spec_kw))
                    times[name].append(dt)
                    same[name] = same[name] and got == plain_ids[s]
                    counts[name][0] += m.last_speculation["accepted"]
                    counts[name][1] += m.last_speculation["drafted"]
            res[f"seconds_per_{name_}_cfg_greedy"] = round(statistics.median(times["plain"]), 4)
            for name in variants:
                res[f"seconds_per_{name_}_cfg_greedy_{name}_k{k}"] = round(statistics.median(times[name]), 4)
                res[f"{name_}_{name}_k{k}_identical_ids"] = same[name]
                res[f"{name_}_{name}_k{k}_acceptance"] = round(counts[name][0] / max(1, counts[name][1]), 3)
    return res


SPEC_TASKS = (
    ("draw", "a drawing of the digit seven", dict(output="image", cfg_scale=3.0), 0.5),
    ("speak", "say seven", dict(output="audio", cfg_scale=3.0, max_audio_seconds=1.5), 0.3),
    ("text", "a drawing of the digit", dict(output="text", max_new_tokens=48), None),
)


def bench_trained(model_run: str, draft_run: str | None, ks: list[int], rounds: int) -> list[dict]:
    """Plain against speculative decoding, and fp32 against bf16/int8 weights, on a trained model's tasks."""
    import tessera

    m = tessera.load(model_run, device="cpu")
    draft = tessera.load(draft_run, device="cpu") if draft_run else None
    low = {name: tessera.load(model_run, device="cpu", dtype=name) for name in ("bf16", "int8")}
    out = []

    def timed(fn):
        t = time.perf_counter()
        r = fn()
        return time.perf_counter() - t, r

    for task, prompt, kw, temp in SPEC_TASKS:
        for mode, temperature in (("greedy", 0.0), ("sampled", temp)):
            if temperature is None:
                continue
            seeds = list(range(rounds))
            plain = lambda s: m.generate_ids(prompt, temperature=temperature, seed=s, draft=False, **kw)[0]  # noqa: E731
            ref = [plain(s) for s in seeds]  # warm-up, and the ids to match
            row = {"model": model_run, "task": task, "mode": mode, "temperature": temperature,
                   "tokens": round(statistics.mean(len(r) for r in ref), 1)}
            variants = {}
            if draft is not None:
                for k in ks:
                    variants[f"spec_k{k}"] = (lambda s, k=k: m.generate_ids(prompt, temperature=temperature, seed=s,
                                                                            draft=draft, draft_tokens=k, **kw)[0])
            for k in ks:
                for free in ("lookup", "jacobi"):
                    variants[f"{free}_k{k}"] = (lambda s, k=k, free=free: m.generate_ids(
                        prompt, temperature=temperature, seed=s, draft=free, draft_tokens=k, **kw)[0])
            for name, lm in low.items():
                variants[name] = (lambda s, lm=lm: lm.generate_ids(prompt, temperature=temperature, seed=s, **kw)[0])
            times = {"plain": [], **{v: [] for v in variants}}
            stats = {v: {"drafted": 0, "accepted": 0, "rounds": 0} for v in variants
                     if v.startswith(("spec", "lookup", "jacobi"))}
            same = {v: True for v in variants}
            for s in seeds:  # alternating, so a noisy machine affects every side
                times["plain"].append(timed(lambda: plain(s))[0])
                for v, fn in variants.items():
                    dt, ids = timed(lambda: fn(s))
                    times[v].append(dt)
                    same[v] = same[v] and ids == ref[s]
                    if v in stats:
                        for key in stats[v]:
                            stats[v][key] += m.last_speculation[key]
            base = statistics.median(times["plain"])
            row["plain_seconds"] = round(base, 4)
            for v in variants:
                row[f"{v}_seconds"] = round(statistics.median(times[v]), 4)
                row[f"{v}_speedup"] = round(base / statistics.median(times[v]), 3)
                if mode == "greedy":
                    row[f"{v}_identical_ids"] = same[v]
                if v in stats:
                    st = stats[v]
                    row[f"{v}_acceptance"] = round(st["accepted"] / max(1, st["drafted"]), 3)
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="demo,small")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gpu-1b", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time tessera with its decode step compiled")
    p.add_argument("--skip-images", action="store_true", help="leave out the seconds-per-image rows")
    p.add_argument("--model-run", help="a trained run: time its tasks plain, speculative and in bf16/int8")
    p.add_argument("--draft-run", help="a draft run over the same bundle, for the speculative rows")
    p.add_argument("--draft-k", default="2,4", help="draft tokens per round, comma-separated")
    p.add_argument("--lookup-k", default="4,8,16",
                   help="prompt-lookup rows of every preset (draft tokens per round, comma-separated; '' for none)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = demo_bundle(Path(tmp))
        presets = [x for x in args.presets.split(",") if x] + (["1b"] if args.gpu_1b else [])
        for preset in presets:
            r = bench(preset, bundle, args.new_tokens, args.rounds, device, args.compile, not args.skip_images,
                      tuple(int(k) for k in args.lookup_k.split(",") if k))
            print(json.dumps(r), flush=True)
            runs.append(r)
    if args.model_run:
        runs += bench_trained(args.model_run, args.draft_run, [int(k) for k in args.draft_k.split(",")],
                              args.rounds)
    write_result(args.out, {"benchmark": "generate_throughput", "machine": machine(device), "runs": runs})


if __name__ == "__main__":
    main()
