"""The public API: `tessera.load(run)` -> `Tessera`, which generates, streams and scores.

    m = tessera.load("run/")
    m.generate(["what digit is this?", Image.open("7.png")], output="text")          # -> ["seven"]
    m.generate("a drawing of the digit seven", output="image", cfg_scale=3.0, seed=0)  # -> [PIL.Image]
    m.generate("say seven", output="audio")                                          # -> [tessera.Audio]
    m.generate([["draw 1"], ["draw 2"]], output="image")     # a list of prompts (lists): one batch
    m.chat([{"role": "user", "content": "draw a three"}], output="image", cfg_scale=3.0)  # a conversation
    for piece in m.stream("describe", output="any"): ...   # text pieces as decoded, media as spans close
    m.score("what digit is this?", " seven")                  # summed log-probability of the continuation

A prompt is a str, a PIL image, a `tessera.Audio`, or a list of them; a batch is a list of such lists.
Outputs are lists of segments: str, PIL.Image.Image, tessera.Audio.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from tessera.config import from_dict
from tessera.errors import TesseraError
from tessera.model.constrained import AUDIO, CODES, TEXT, FSMConfig, SpanFSM
from tessera.model.generate import DEFAULT_DRAFT_TOKENS, GenerationConfig, check_draft_tokens, decode
from tessera.model.quant import quantize_int8
from tessera.model.speculative import PromptLookup, speculative_decode
from tessera.model.transformer import ModelConfig, Transformer
from tessera.runtime.inductor import pin_cpu_threads
from tessera.storage import load_tensors, read_json
from tessera.tokenizers.bundle import load_bundle
from tessera.tokenizers.chat import split_message
from tessera.tokenizers.multimodal import MultimodalTokenizer
from tessera.unimodal.media import Audio

OUTPUTS = ("text", "image", "audio", "any")


class LoadError(TesseraError):
    pass


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(dtype, device: torch.device) -> tuple[torch.dtype, bool]:
    """(the weights' float dtype, whether Linear weights become int8) for `load`'s `dtype` argument: None (bf16
    on CUDA, fp32 elsewhere), a torch dtype, "fp32", "bf16", "fp16", or "int8" (weight-only int8 Linear
    layers, everything else in fp32)."""
    if dtype is None:
        return (torch.bfloat16 if device.type == "cuda" else torch.float32), False
    if isinstance(dtype, torch.dtype):
        return dtype, False
    if dtype == "int8":
        return torch.float32, True
    if dtype in DTYPES:
        return DTYPES[dtype], False
    raise ValueError(f"dtype must be a torch dtype or one of {', '.join([*DTYPES, 'int8'])}, not {dtype!r}")


def _is_segment(x) -> bool:
    return isinstance(x, (str, Image.Image, Audio))


DRAFT_FREE = ("lookup", "jacobi")  # the drafts that need no model (`PromptLookup`)


class Tessera:
    """A trained decoder with its tokenizer bundle."""

    def __init__(self, model: Transformer, tokenizer: MultimodalTokenizer, run_dir: Path | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.run_dir = run_dir
        self.device = next(model.parameters()).device
        self.fsm = SpanFSM(tokenizer.layout, tokenizer.eos_id, device=self.device, bos_id=tokenizer.bos_id)
        self._step_fn = None
        self.draft: Tessera | None = None  # the default draft model of speculative decoding (`set_draft`)
        self.draft_tokens = DEFAULT_DRAFT_TOKENS
        self.last_speculation: dict | None = None  # rounds, drafted and accepted tokens of the last call

    # ------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, run_dir: str | Path, device=None, dtype=None, compile: bool = False, draft=None,
             draft_tokens: int = DEFAULT_DRAFT_TOKENS) -> "Tessera":
        run = Path(run_dir)
        cfg_path, weights = run / "config.json", run / "model.safetensors"
        if not cfg_path.is_file():
            raise LoadError(f"{run} is not a tessera run: config.json is missing")
        if not weights.is_file():
            raise LoadError(f"{run} has no model.safetensors (has training reached its first checkpoint?)")
        config = read_json(cfg_path)
        if not isinstance(config, dict) or config.get("format") != "tessera-run":
            raise LoadError(f"{cfg_path}: not a tessera run config")
        for key in ("model", "tokenizer_hash"):
            if key not in config:
                raise LoadError(f"{cfg_path} has no {key!r}; it was not written by tessera train")
        if not isinstance(device, torch.device):  # a name: checked (one line where CUDA is missing)
            from tessera.runtime.distributed import parse_device

            device = parse_device(device)
        dtype, int8 = resolve_dtype(dtype, device)
        tokenizer = load_bundle(run / "tokenizer", device=device)
        if tokenizer.bundle_hash != config["tokenizer_hash"]:
            raise LoadError(f"{run}: the model was trained with bundle {config['tokenizer_hash'][:12]} but "
                            f"{run / 'tokenizer'} is {tokenizer.bundle_hash[:12]}")
        mcfg = from_dict(ModelConfig, config["model"])
        if mcfg.vocab_size != tokenizer.layout.padded_vocab_size:
            raise LoadError(f"{run}: the model has {mcfg.vocab_size} embedding rows, the bundle needs "
                            f"{tokenizer.layout.padded_vocab_size}")
        with torch.device("meta"):
            model = Transformer(mcfg)
        state = load_tensors(weights, device=str(device))
        expected = model.state_dict()
        for k, v in state.items():
            if k in expected and v.shape != expected[k].shape:
                raise LoadError(f"{weights}: {k} has shape {tuple(v.shape)}, but config.json's model needs "
                                f"{tuple(expected[k].shape)}; the weights belong to another model")
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if not (mcfg.tie_embeddings and k == "output.weight")]
        if missing or unexpected:
            raise LoadError(f"{weights}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if mcfg.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
        model.init_rope(device=device)  # the one tensor the weights file does not hold
        model.to(device=device, dtype=dtype)
        if int8:
            quantize_int8(model)
        m = cls(model, tokenizer, run)
        if compile:
            m.compile()
        if draft is not None:
            if not isinstance(draft, Tessera) and draft not in DRAFT_FREE:
                if isinstance(draft, str) and draft.lower() in DRAFT_FREE and not Path(draft).exists():
                    raise ValueError(f"draft {draft!r}: the draft-free modes are spelled {' or '.join(DRAFT_FREE)}")
                draft = cls.load(draft, device=device, dtype="int8" if int8 else dtype)
            m.set_draft(draft, draft_tokens)
        return m

    def set_draft(self, draft: "Tessera | str | None", draft_tokens: int = DEFAULT_DRAFT_TOKENS) -> None:
        """Make `draft` the default draft of speculative decoding, proposing `draft_tokens` tokens a round: a
        smaller model over the same tokenizer bundle, or "lookup" / "jacobi" (no model: prompt lookup, and
        Jacobi iteration on top of it; docs/generation.md). None turns it off."""
        if draft is not None:
            self._check_draft(draft, draft_tokens)
        self.draft, self.draft_tokens = draft, draft_tokens

    def _check_draft(self, draft, draft_tokens) -> None:
        check_draft_tokens(draft_tokens)
        if isinstance(draft, str) and draft in DRAFT_FREE:
            return
        if not isinstance(draft, Tessera):
            raise TypeError(f"draft must be a tessera.Tessera (a loaded model), 'lookup' or 'jacobi', not {draft!r}")
        a, b = self.tokenizer, draft.tokenizer
        same = a is b or (a.bundle_hash is not None and a.bundle_hash == b.bundle_hash)
        if not same:
            raise ValueError(f"the draft model's tokenizer bundle ({(b.bundle_hash or 'unhashed')[:12]}) is not "
                             f"this model's ({(a.bundle_hash or 'unhashed')[:12]}); a draft must share the bundle")
        if draft.model.cfg.vocab_size != self.model.cfg.vocab_size:
            raise ValueError(f"the draft has {draft.model.cfg.vocab_size} embedding rows, this model "
                             f"{self.model.cfg.vocab_size}")
        if draft.device != self.device:
            raise ValueError(f"the draft is on {draft.device}, this model on {self.device}")

    def compile(self) -> None:
        """Compile the decode step (with a static KV cache); on CUDA, captured as CUDA graphs."""
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        pin_cpu_threads()
        compiled = torch.compile(self.model, mode=mode, dynamic=False)
        self._step_fn = lambda ids, pos, cache: compiled(ids, pos, cache=cache)

    # ------------------------------------------------------------------------------------- prompts
    def _prompt_ids(self, prompt) -> list[int]:
        if not (_is_segment(prompt) or isinstance(prompt, (list, tuple))):
            raise TypeError(f"a prompt is a str, PIL.Image.Image, tessera.Audio or a list of them, not "
                            f"{type(prompt).__name__}")
        segs = [prompt] if _is_segment(prompt) else list(prompt)
        for s in segs:
            if not _is_segment(s):
                raise TypeError(f"a prompt segment must be str, PIL.Image.Image or tessera.Audio, not {type(s).__name__}")
        return self.tokenizer.encode(segs, bos=True)

    def _plan(self, output: str, config: GenerationConfig):
        """(suffix ids after the prompt, FSM config, start state, remaining codes, budget)."""
        L, tok = self.tokenizer.layout, self.tokenizer
        max_new_tokens, image_size, max_audio_seconds = config.max_new_tokens, config.image_size, config.max_audio_seconds
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, not {output!r}")
        if output == "text":
            return [], FSMConfig(), TEXT, 0, 64 if max_new_tokens is None else max_new_tokens
        if output == "image":
            if tok.image_codec is None:
                raise TesseraError("this model's tokenizer has no image codec")
            info = tok.image_codec.info
            size = tuple(image_size) if image_size is not None else info.default_size
            if size is None:
                raise TesseraError("give image_size=(H, W): the image codec has no default size")
            f = info.downsample
            if size[0] % f or size[1] % f:
                raise ValueError(f"image_size {size} must be multiples of the codec's factor {f}")
            h, w = size[0] // f, size[1] // f
            if max(h, w) > L.max_grid:
                raise ValueError(f"image_size {size} needs a {h}x{w} grid; the vocabulary allows {L.max_grid} per side")
            span = h * w + 1  # the codes and <eoi>: an image's length is fixed by its grid
            if max_new_tokens is not None and max_new_tokens < span:
                raise ValueError(f"max_new_tokens {max_new_tokens} cannot hold a {h}x{w}-code image ({h * w} codes and "
                                 f"<eoi>, {span} tokens); leave it unset: image_size fixes an image's length")
            return [L.boi, L.h_token(h), L.w_token(w)], FSMConfig(stop_after_span=True), CODES, h * w, span
        if output == "audio":
            if tok.audio_codec is None:
                raise TesseraError("this model's tokenizer has no audio codec")
            info = tok.audio_codec.info
            seconds = 10.0 if max_audio_seconds is None else max_audio_seconds
            frames = max(1, math.ceil(seconds * info.frame_rate))
            budget = frames * L.audio_levels + 1 if max_new_tokens is None else max_new_tokens
            if budget < L.audio_levels + 1:
                raise ValueError(f"max_new_tokens {budget} cannot hold one audio frame ({L.audio_levels} codes) and <eoa>")
            return [L.boa], FSMConfig(stop_after_span=True, max_audio_frames=frames), AUDIO, 0, budget
        frames = 0
        if max_audio_seconds is not None and tok.audio_codec is not None:
            frames = max(1, math.ceil(max_audio_seconds * tok.audio_codec.info.frame_rate))
        max_grid = 0
        if tok.image_codec is not None and tok.image_codec.info.max_size:
            max_grid = tok.image_codec.info.max_size // tok.image_codec.info.downsample
        cfg = FSMConfig(allow_image=L.has_image, allow_audio=L.has_audio, max_grid=max_grid, max_audio_frames=frames)
        return [], cfg, TEXT, 0, 256 if max_new_tokens is None else max_new_tokens

    # ------------------------------------------------------------------------------------ generate
    def _resolve_draft(self, config: GenerationConfig):
        """The draft model and its token count for a call: None takes the default (`set_draft`), False none."""
        if config.draft is False:
            return None, 0
        k = self.draft_tokens if config.draft_tokens is None else config.draft_tokens
        draft = self.draft if config.draft is None else config.draft
        if draft is not None:
            self._check_draft(draft, k)
        return draft, k

    def _tokens(self, prompts, output, config: GenerationConfig):
        draft, k = self._resolve_draft(config)
        suffix, fsm_cfg, start, remaining, budget = self._plan(output, config)
        ids = [self._prompt_ids(p) + suffix for p in prompts]
        # Positions past max_seq_len were never trained: refuse them rather than generate noise. A default
        # budget shrinks to the room left (the FSM still closes spans in time); an explicit one must fit.
        limit, longest = self.model.cfg.max_seq_len, max(len(i) for i in ids)
        if longest >= limit:
            raise ValueError(f"the prompt is {longest} tokens; the model's max_seq_len is {limit}, which must also "
                             f"leave room for at least one new token")
        if longest + budget > limit:
            if config.max_new_tokens is not None or output == "image":
                raise ValueError(f"the prompt ({longest} tokens) and {budget} new tokens exceed the model's "
                                 f"max_seq_len {limit}: shorten the prompt or lower max_new_tokens")
            budget = limit - longest
            if output == "audio" and budget < self.tokenizer.layout.audio_levels + 1:
                raise ValueError(f"the prompt ({longest} tokens) leaves no room for one audio frame within the "
                                 f"model's max_seq_len {limit}")
        uncond = None
        if config.cfg_scale != 1.0:
            if output not in ("image", "audio"):
                raise ValueError("cfg_scale applies to output='image' or 'audio'")
            # the prompt with its conditioning dropped, as the loader's conditioning dropout trains it
            uncond = [[self.tokenizer.bos_id] + suffix for _ in prompts]
        run = replace(config, max_new_tokens=budget, draft_tokens=k or None)
        common = dict(start_state=start, pad_id=self.tokenizer.pad_id, start_remaining=remaining,
                      uncond_prompts=uncond, min_new_tokens=1 if output == "text" else 0)
        if draft is not None:
            self.last_speculation = {}
            proposer = PromptLookup(jacobi=draft == "jacobi") if isinstance(draft, str) else draft.model
            gen = speculative_decode(self.model, proposer, ids, self.fsm, fsm_cfg, run, stats=self.last_speculation,
                                     **common)
        else:
            gen = decode(self.model, ids, self.fsm, fsm_cfg, run, step_fn=self._step_fn,
                         static_cache=self._step_fn is not None, **common)
        return suffix, gen

    def generate_ids(self, prompt, *, output="text", config: GenerationConfig | None = None,
                     **options) -> list[list[int]]:
        """The generated ids of each prompt (including the span opener for image/audio outputs). The options
        are `generate`'s."""
        config = GenerationConfig.from_options(config, **options)
        prompts, _ = self._batch(prompt)
        suffix, gen = self._tokens(prompts, output, config)
        steps = [t.cpu() for t in gen]
        out = torch.stack(steps, 1).tolist() if steps else [[] for _ in prompts]
        result = []
        for row in out:
            ids = []
            for t in row:
                if t == self.tokenizer.pad_id:
                    break
                ids.append(t)
                if t == self.tokenizer.eos_id:
                    break
            result.append(suffix + ids)
        return result

    def _batch(self, prompt) -> tuple[list, bool]:
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, (list, tuple)) for p in prompt):
            return list(prompt), True
        return [prompt], False

    def generate(self, prompt, *, output: str = "text", config: GenerationConfig | None = None, **options):
        """Generate from one prompt (-> list of segments) or a batch of prompts (-> one list per prompt).

        The options are `GenerationConfig`'s fields, as keyword arguments (`temperature=0, seed=1`), as
        `config=GenerationConfig(...)`, or both (the keywords override the config's fields); an unknown name is a
        TypeError.

        output: "text", "image" (exactly one image of `image_size` pixels, default the codec's), "audio" (one
        clip of at most `max_audio_seconds`, default 10), or "any" (the model chooses when to open spans).
        output="text" answers with at least one token: its first step cannot end the document (an empty answer
        is never what a request for text wants; transformers' `min_new_tokens=1` does the same).
        temperature 0 is greedy; top_k / top_p filter the distribution; cfg_scale > 1 applies classifier-free
        guidance inside image/audio spans. The same seed gives the same output; for a batch, a list of seeds
        (one per prompt) makes every prompt sample exactly as it would alone.

        max_new_tokens (>= 1) bounds the generated tokens; None means 64 for text, 256 for "any", and
        `max_audio_seconds` of frames for audio, shrunk to the room the prompt leaves within the model's
        max_seq_len. An image's length is fixed by its grid (h*w codes and <eoi>), so for output="image" it
        only has to be large enough to hold that span. Out-of-range arguments (temperature < 0, top_p outside
        (0, 1], a non-finite cfg_scale, a prompt that does not fit max_seq_len) raise ValueError.

        draft: a smaller model over the same tokenizer bundle for speculative decoding, or "lookup" (guesses
        copied from earlier in the prompt and output; no draft model), or "jacobi" (the same, and after a
        rejection the model's own predictions past it guess first: Jacobi iteration) (None: the default set by
        `load(..., draft=...)` or `set_draft`, if any; False: plain decoding), proposing `draft_tokens`
        tokens a round (default 4). Greedy outputs are the same tokens as plain decoding; sampled ones have
        the same distribution (not the same tokens for a seed).
        """
        _, batched = self._batch(prompt)
        ids = self.generate_ids(prompt, output=output, config=config, **options)
        outs = [self.tokenizer.decode(row, strict=True) for row in ids]
        return outs if batched else outs[0]

    def chat_prompt(self, messages) -> list:
        """A conversation rendered by the bundle's chat template, ending with the assistant's prefix: the
        prompt `chat` answers. messages: [{"role": "system" | "user" | "assistant", "content": ...}], where
        content is a str, a PIL image, a `tessera.Audio`, or a list of them."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
        turns = []
        for n, msg in enumerate(messages):
            role, content = split_message(msg, n)
            parts = list(content) if isinstance(content, (list, tuple)) else [content]
            for part in parts:
                if not _is_segment(part):
                    raise TypeError(f"message {n}: content must be str, PIL.Image.Image or tessera.Audio (or a list "
                                    f"of them), not {type(part).__name__}")
            turns.append((role, [(None, part, True) for part in parts]))
        return [value for _, value, _ in self.tokenizer.chat.render(turns, for_reply=True)]

    def chat(self, messages, *, output: str = "text", config: GenerationConfig | None = None, **options) -> list:
        """The assistant's reply to a conversation (see `chat_prompt`), as a list of segments, generated as
        `generate` does: the same `output` modes, constrained spans, CFG and sampling options (`config` and/or
        keywords). A text reply is cut where the model starts another turn."""
        reply = self.generate(self.chat_prompt(messages), output=output, config=config, **options)
        if output == "text":
            return [self.tokenizer.chat.cut_reply("".join(reply))]
        return reply

    def stream(self, prompt, *, output: str = "text", config: GenerationConfig | None = None, **options) -> Iterator:
        """Yield text pieces as they are decoded, and each image or audio clip as its span closes (with a
        draft model, a round's kept tokens arrive together). The options are `generate`'s, for one prompt."""
        config = GenerationConfig.from_options(config, **options)
        if not (_is_segment(prompt) or all(_is_segment(s) for s in prompt)):
            raise ValueError("stream takes one prompt, not a batch")
        suffix, gen = self._tokens([prompt], output, config)
        L, tok = self.tokenizer.layout, self.tokenizer
        text_ids: list[int] = []
        sent = 0
        span: list[int] = list(suffix)
        closers = (L.eoi, L.eoa)
        for t in gen:
            t = int(t[0])
            if t == tok.pad_id or t == tok.eos_id:
                break
            if not span and t in (L.boi, L.boa):  # a span opens: flush the text before it
                s = tok.text.decode(text_ids)
                if len(s) > sent:
                    yield s[sent:]
                text_ids, sent, span = [], 0, [t]
                continue
            if span:
                span.append(t)
                if t in closers:
                    yield from tok.decode(span, strict=True)
                    span = []
                continue
            text_ids.append(t)
            s = tok.text.decode(text_ids)
            if not s.endswith("\ufffd") and len(s) > sent:  # hold back an incomplete UTF-8 sequence
                yield s[sent:]
                sent = len(s)
        s = tok.text.decode(text_ids) if text_ids else ""
        if len(s) > sent:
            yield s[sent:]

    # --------------------------------------------------------------------------------------- score
    @torch.no_grad()
    def score(self, prompt, continuation) -> float:
        """Summed log-probability (natural log) of the continuation's tokens after the prompt."""
        p = self._prompt_ids(prompt)
        cont = [continuation] if _is_segment(continuation) else list(continuation)
        c = self.tokenizer.encode(cont)
        if not c:
            return 0.0
        ids = torch.as_tensor([p + c], device=self.device)
        logits = self.model(ids[:, :-1]).float()
        logp = logits[0, len(p) - 1:].log_softmax(-1)
        target = ids[0, len(p):]
        return float(logp.gather(-1, target[:, None]).sum())


def load(run_dir: str | Path, device=None, dtype=None, compile: bool = False, draft=None,
         draft_tokens: int = DEFAULT_DRAFT_TOKENS) -> Tessera:
    """Load a trained run (its model.safetensors and tokenizer bundle) for generation.

    `dtype`: None (bf16 on CUDA, fp32 on CPU), a torch dtype, "fp32", "bf16", or "int8" (weight-only int8
    Linear layers, a quarter of fp32's bytes per step; see docs/generation.md for what each costs in quality).

    `draft`: a run directory (or a loaded `Tessera`) of a smaller model over the same tokenizer bundle, or
    "lookup" / "jacobi" (draft-free: prompt lookup, and Jacobi iteration on top of it), made the default draft
    of speculative decoding with `draft_tokens` tokens a round."""
    return Tessera.load(run_dir, device=device, dtype=dtype, compile=compile, draft=draft,
                        draft_tokens=draft_tokens)


def random_model(tokenizer: MultimodalTokenizer, preset: str = "tiny", seed: int = 0, **overrides) -> Tessera:
    """A randomly initialized model over a tokenizer (for tests, fuzzing and benchmarks)."""
    from tessera.model.transformer import model_preset

    cfg = model_preset(preset)
    cfg.vocab_size = tokenizer.layout.padded_vocab_size
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = Transformer(cfg)
    model.init_weights(seed=seed)
    return Tessera(model, tokenizer)
