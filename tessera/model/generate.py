"""The decoding loop: batched prompts, a preallocated KV cache, constrained sampling and CFG.

`decode(...)` is a generator that yields one token per row per step; `tessera.Tessera.generate` and
`.stream` are built on it. Prompts of different lengths are left-padded: padded slots are masked out of
attention and positions count real tokens only, so a row computes what it would compute alone.

Classifier-free guidance runs the conditional and unconditional prompts as one batch of 2B rows that take
the same sampled tokens; inside image/audio spans the logits are `uncond + scale * (cond - uncond)`, in text
they are the conditional ones.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

import torch

from tessera.model.constrained import DONE, FSMConfig, SpanFSM
from tessera.model.kv_cache import KVCache

DEFAULT_DRAFT_TOKENS = 4  # guesses a round of speculative decoding, unless a call or `set_draft` says otherwise


def check_draft_tokens(draft_tokens) -> None:
    if not (isinstance(draft_tokens, numbers.Integral) and draft_tokens >= 1):
        raise ValueError(f"draft_tokens must be an integer >= 1, got {draft_tokens!r}")


@dataclass
class GenerationConfig:
    """The options of one generation, validated once (HF's GenerationConfig plays the same part).

    `Tessera.generate`/`generate_ids`/`stream` take these as keyword arguments or as `config=`; `decode` and
    `speculative_decode` take the resolved config (`max_new_tokens` then the budget, never None)."""

    max_new_tokens: int | None = None  # None: the output's default (see `Tessera.generate`)
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    cfg_scale: float = 1.0  # classifier-free guidance inside image/audio spans; 1: off
    seed: int | list[int] | None = None  # a list: one generator per prompt of a batch
    image_size: tuple[int, int] | None = None  # output="image": pixels (H, W); None: the codec's default
    max_audio_seconds: float | None = None  # output="audio" (default 10 s) or "any"
    draft: object = None  # speculative decoding: a Tessera, "lookup", "jacobi", None (the default) or False (none)
    draft_tokens: int | None = None  # guesses a round; None: the default

    def __post_init__(self):
        if self.max_new_tokens is not None and not (isinstance(self.max_new_tokens, numbers.Integral)
                                                    and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be an integer >= 1 (None: the output's default), got "
                             f"{self.max_new_tokens!r}")
        # `not x >= 0` is also true for NaN, which would otherwise reach torch.multinomial as a bad distribution.
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: off), got {self.top_p}")
        if not math.isfinite(self.cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number (1: off), got {self.cfg_scale}")
        if not (isinstance(self.top_k, numbers.Integral) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if self.max_audio_seconds is not None and not (isinstance(self.max_audio_seconds, numbers.Real)
                                                       and 0 < self.max_audio_seconds < math.inf):
            raise ValueError(f"max_audio_seconds must be a finite number > 0 (None: the default), got "
                             f"{self.max_audio_seconds!r}")
        if self.draft_tokens is not None:
            check_draft_tokens(self.draft_tokens)

    @classmethod
    def from_options(cls, config: GenerationConfig | None = None, **options) -> GenerationConfig:
        """`config` (default: the defaults) with the keyword `options` (its field names) set over it."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown generation option(s) {', '.join(unknown)}; the options are "
                            f"{', '.join(f.name for f in fields(cls))}")
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"config must be a GenerationConfig, not {type(config).__name__}")
        return replace(config or cls(), **options)


def sample(logits: torch.Tensor, cfg: GenerationConfig, generator) -> torch.Tensor:
    """logits (B, V) with disallowed ids at -inf -> token ids (B,).

    `generator` is one torch.Generator for the batch, a list of one per row (each row then samples exactly as
    it would alone), or None (the global RNG).
    """
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    probs = probabilities(logits, cfg)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def probabilities(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """logits (..., V) -> the distribution `sample` draws from at temperature > 0: scaled, top-k and top-p
    filtered, softmaxed."""
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, idx = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        logits = logits.scatter(-1, idx, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (B, T), valid (B, T) and positions (B, T) for left-padded prompts."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, T - len(p):] = torch.as_tensor(p, dtype=torch.long)
            valid[i, T - len(p):] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    return ids.to(device), valid.to(device), positions.to(device)


def budget(config: GenerationConfig) -> int:
    if config.max_new_tokens is None:
        raise ValueError("decoding needs the budget: a GenerationConfig with max_new_tokens set")
    return config.max_new_tokens


def generators(seed: int | list[int] | None, n: int, device):
    """The sampling RNG of a batch of `n` prompts: one generator, one per prompt (a list of seeds), or None."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise ValueError(f"{len(seed)} seeds for {n} prompts")
        return [torch.Generator(device=device).manual_seed(int(s)) for s in seed]
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


@torch.no_grad()
def decode(
    model,
    prompts: list[list[int]],
    fsm: SpanFSM,
    fsm_cfg: FSMConfig,
    config: GenerationConfig,
    *,
    start_state: int,
    pad_id: int,
    start_remaining: int = 0,
    uncond_prompts: list[list[int]] | None = None,
    step_fn=None,
    static_cache: bool = False,
    min_new_tokens: int = 0,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,), step by step, until every row is done or the budget
    (`config.max_new_tokens`) is spent. `config` also gives the sampling options, the seed and `cfg_scale`.

    The first `min_new_tokens` steps cannot end the document (EOS is masked), as in HF's `min_new_tokens`.

    Rows that have finished yield `pad_id`. `step_fn(ids, positions, cache)` may replace the model call of a
    decode step (e.g. a compiled or CUDA-graph-captured version; it then needs `static_cache=True`).
    """
    max_new_tokens, cfg_scale = budget(config), config.cfg_scale
    B = len(prompts)
    device = next(model.parameters()).device
    guided = uncond_prompts is not None and cfg_scale != 1.0
    rows = prompts + (uncond_prompts if guided else [])
    ids, valid, positions = left_pad(rows, pad_id, device)
    cache = KVCache.for_model(model, len(rows), ids.shape[1] + max_new_tokens, device=device, static=static_cache)
    cache.begin(ids.shape[1], valid)
    logits = model(ids, positions, cache=cache, logits_to_keep=1)[:, -1].float()
    cache.advance(ids.shape[1])
    next_pos = positions[:, -1] + 1
    generator = generators(config.seed, B, device)
    st = fsm.init_state(B, start_state, max_new_tokens, remaining=start_remaining)
    spans = fsm.reachable(fsm_cfg, start_state)  # which span kinds the FSM must track at all
    for step in range(max_new_tokens):
        cond = logits[:B]
        if guided:
            unc = logits[B:]
            cond = torch.where(fsm.in_span(st)[:, None], unc + cfg_scale * (cond - unc), cond)
        cond = cond.masked_fill(~fsm.allowed(st, fsm_cfg, *spans), float("-inf"))
        if step < min_new_tokens:
            cond[:, fsm.eos] = float("-inf")
        tok = sample(cond, config, generator)
        tok = torch.where(st["state"] == DONE, pad_id, tok)
        yield tok
        st = fsm.advance(st, tok, fsm_cfg, *spans)
        if bool((st["state"] == DONE).all()) or step == max_new_tokens - 1:
            return
        feed = torch.cat([tok, tok]) if guided else tok
        cache.begin(1)
        if step_fn is not None:
            logits = step_fn(feed[:, None], next_pos[:, None], cache)[:, -1].float()
        else:
            logits = model(feed[:, None], next_pos[:, None], cache=cache)[:, -1].float()
        cache.advance(1)
        next_pos = next_pos + 1
