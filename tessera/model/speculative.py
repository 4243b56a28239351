"""Exact speculative decoding: a small draft model proposes `k` tokens, the model checks them in one pass.

Decoding one sequence at a time reads every weight of the model once per token; on a CPU (and on a GPU at
batch 1) that read, not the arithmetic, sets the speed. A draft model that shares the vocabulary guesses the
next `k` tokens one by one (cheap: it is small), then the model scores all `k` guesses and the token after
them in one forward pass, reading its weights once for up to `k + 1` tokens.

The output is the model's own, not the draft's:
- greedy (temperature 0): a guess is kept while it equals the model's argmax; at the first mismatch the
  model's argmax is taken. The tokens are the ones plain greedy decoding gives.
- sampled: the standard rejection rule (Leviathan et al. 2023, Chen et al. 2023). A guess `d` drawn from the
  draft's distribution `q` is kept with probability `min(1, p(d) / q(d))`, `p` being the model's; at the first
  rejection the token is drawn from the residual `max(0, p - q)`, renormalized; when all `k` are kept one
  more is drawn from `p`. Every token then has exactly the distribution plain sampling gives it (not the
  same tokens for a seed: the random numbers are used differently).

`p` and `q` are the distributions plain decoding samples from: the constrained-decoding mask of the FSM
(at the state the guesses so far lead to), classifier-free guidance inside spans, the temperature, top-k and
top-p. Guesses therefore always keep spans whole, and the FSM state after a round is the one its kept tokens
lead to.

Both KV caches are rolled back after a rejection (`KVCache.keep`). In a batch, rows keep different numbers of
tokens: the slots a row rejected become holes (masked like padding, positions count real tokens only), and
the cache squeezes them out (`KVCache.compact`) when it runs out of slots. With classifier-free guidance the
unconditional half of the batch takes the conditional rows' tokens, in both models.

The draft reads a guess only when it makes the next one: when every guess was kept, the last one is read at
the start of the next round, in the same forward pass as the model's new token.

Without a draft model, `PromptLookup` guesses by copying: it finds the latest earlier occurrence of the
sequence's last few tokens (in the prompt or the output so far) and proposes the tokens that followed it.
A copied guess is a point mass `q`, so the same rule keeps it with probability `p(d)` and draws a rejected
position from `p` without `d`; the output is exact in the same sense.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tessera.model.constrained import DONE, FSMConfig, SpanFSM
from tessera.model.generate import (
    DEFAULT_DRAFT_TOKENS,
    GenerationConfig,
    budget,
    generators,
    left_pad,
    probabilities,
)
from tessera.model.kv_cache import KVCache


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The distribution a rejected position draws from: max(0, p - q), renormalized (p where that is empty)."""
    r = (p - q).clamp(min=0)
    s = r.sum(-1, keepdim=True)
    return torch.where(s > 0, r / s.clamp(min=1e-30), p)


def _draw(probs: torch.Tensor, generator) -> torch.Tensor:
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _uniform(rows: int, n: int, generator, device) -> torch.Tensor:
    if isinstance(generator, list):
        return torch.stack([torch.rand(n, generator=g, device=device) for g in generator])
    return torch.rand(rows, n, generator=generator, device=device)


JACOBI_YIELDS_TO = 2  # the n-gram match length from which copying outranks Jacobi's predictions


class PromptLookup:
    """Draft-free guesses: the tokens that followed the latest earlier match of the last `n` tokens (the
    longest `n` from `max_ngram` down to `min_ngram` that matches). A continuation that runs into the end of
    the history goes on copying its own guesses, so a match `p` tokens back proposes the last `p` tokens
    repeated: the next turns of a loop. No match: the last token, repeated."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, jacobi: bool = False):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        # Jacobi iteration: after a rejection, the model's own predictions for the positions past it (made in
        # the same pass, from a prefix with one wrong token) become the first guesses of the next round
        self.jacobi = jacobi

    def match(self, history: list[int], k: int) -> tuple[list[int], int]:
        """`k` guesses and the length of the n-gram they continue (0: no match, the last token repeated)."""
        h = history
        for n in range(min(self.max_ngram, len(h) - 1), self.min_ngram - 1, -1):
            tail = h[-n:]
            for start in range(len(h) - n - 1, -1, -1):  # latest match first, not the tail itself
                if h[start : start + n] == tail:
                    # what followed the match, copied on into the guesses themselves: a continuation that
                    # reaches the end of the history repeats the period it found (a loop, a row of equal codes)
                    seq, at = list(h), start + n
                    for i in range(k):
                        seq.append(seq[at + i])
                    return seq[len(h):], n
        return [h[-1]] * k, 0

    def propose(self, history: list[int], k: int) -> list[int]:
        return self.match(history, k)[0]

    def guesses(self, history: list[int], ahead: list[int], k: int) -> list[int]:
        """A round's `k` guesses. With Jacobi predictions `ahead` from the last pass: copying still leads where
        the history repeats itself (a match of `JACOBI_YIELDS_TO` tokens or more, the loop Jacobi cannot see
        from one wrong token), the predictions elsewhere, copying filling the rest."""
        copied, n = self.match(history, k)
        if not ahead or n >= JACOBI_YIELDS_TO:
            return copied
        return ahead + self.propose(history + ahead, k - len(ahead))


def _prefill(model, cache: KVCache, ids, valid, positions) -> None:
    if ids.shape[1]:
        cache.begin(ids.shape[1], valid)
        model(ids, positions, cache=cache, logits_to_keep=1)
        cache.advance(ids.shape[1])


@torch.no_grad()
def speculative_decode(
    model,
    draft,
    prompts: list[list[int]],
    fsm: SpanFSM,
    fsm_cfg: FSMConfig,
    config: GenerationConfig,
    *,
    start_state: int,
    pad_id: int,
    start_remaining: int = 0,
    uncond_prompts: list[list[int]] | None = None,
    min_new_tokens: int = 0,
    stats: dict | None = None,
) -> Iterator[torch.Tensor]:
    """`decode`'s contract (one (B,) tensor of tokens per step; finished rows yield `pad_id`), computed with
    `draft` (a model over the same vocabulary, or a `PromptLookup`) proposing `config.draft_tokens` tokens a
    round (None: `DEFAULT_DRAFT_TOKENS`). `stats`, if given, receives the counts of rounds, drafted and
    accepted tokens."""
    k = DEFAULT_DRAFT_TOKENS if config.draft_tokens is None else config.draft_tokens
    max_new_tokens, cfg_scale = budget(config), config.cfg_scale
    B = len(prompts)
    device = next(model.parameters()).device
    guided = uncond_prompts is not None and cfg_scale != 1.0
    rows = prompts + (uncond_prompts if guided else [])
    R = len(rows)
    ids, valid, positions = left_pad(rows, pad_id, device)
    T = ids.shape[1]
    # Real tokens per row never exceed T + max_new_tokens; a round writes at most k + 1 more slots.
    max_len = T + max_new_tokens + 2 * (k + 1)
    tcache = KVCache.for_model(model, R, max_len, device=device)
    lookup = isinstance(draft, PromptLookup)
    dcache = None if lookup else KVCache.for_model(draft, R, max_len, device=device)
    # Both caches hold everything but the last token, which the next round feeds.
    for m, c in ((model, tcache), (draft, dcache)):
        if c is not None:
            _prefill(m, c, ids[:, :-1], valid[:, :-1], positions[:, :-1])
    last, pos = ids[:, -1], positions[:, -1]  # (R,)
    carry = torch.full((R,), pad_id, dtype=torch.long, device=device)  # the kept guess the draft has not read
    carry_ok = torch.zeros(R, dtype=torch.bool, device=device)

    generator = generators(config.seed, B, device)
    greedy = config.temperature <= 0
    st = fsm.init_state(B, start_state, max_new_tokens, remaining=start_remaining)
    spans = fsm.reachable(fsm_cfg, start_state)
    pad_only = fsm.rows[fsm.R_DONE]
    emitted = torch.zeros(B, dtype=torch.long, device=device)
    outs: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    sent = 0
    n_rounds = n_drafted = n_accepted = 0
    ahead: list[list[int]] = [[] for _ in range(B)]  # Jacobi: the model's predictions past a rejection
    both = (lambda x: torch.cat([x, x])) if guided else (lambda x: x)
    arange = torch.arange(k + 1, device=device)

    def allowed(s, j):
        """What plain decoding allows at the FSM state `s`, `j` tokens into the round."""
        mask = fsm.allowed(s, fsm_cfg, *spans)
        if min_new_tokens:
            mask[:, fsm.eos] &= emitted + j >= min_new_tokens
        return torch.where((emitted + j >= max_new_tokens)[:, None], pad_only, mask)  # past the budget: nothing

    def constrain(logits, s, mask):
        """The logits plain decoding samples from: guided inside spans, then masked."""
        cond = logits[:B]
        if guided:
            unc = logits[B:]
            cond = torch.where(fsm.in_span(s)[:, None], unc + cfg_scale * (cond - unc), cond)
        return cond.masked_fill(~mask, float("-inf"))

    while True:
        # A batch whose rows kept different counts leaves holes; squeeze them out when the slots run short.
        for c in (tcache, dcache):
            if c is not None and c.length + k + 2 > c.max_len:
                c.compact()
        # ---- the draft guesses k tokens, each under the FSM state the earlier guesses lead to
        states, masks, guesses, qs = [st], [], [], []
        if lookup:
            copied = torch.tensor([draft.guesses(prompts[i] + outs[i], ahead[i], k) for i in range(B)],
                                  device=device)
        d0 = dcache.length if dcache is not None else 0
        two = bool(carry_ok.any()) and not lookup
        if two:
            d_in, d_pos = torch.stack([carry, last], 1), torch.stack([(pos - 1).clamp(min=0), pos], 1)
            d_valid = torch.stack([carry_ok, torch.ones_like(carry_ok)], 1)
        else:
            d_in, d_pos, d_valid = last[:, None], pos[:, None], None
        s = st
        for j in range(k):
            if lookup:
                masks.append(allowed(s, j))
                d = copied[:, j]
                d = torch.where(masks[-1].gather(1, d[:, None])[:, 0], d, masks[-1].long().argmax(-1))  # allowed
                if not greedy:
                    qs.append(torch.nn.functional.one_hot(d, masks[-1].shape[1]).float())
                guesses.append(d)
                s = fsm.advance(dict(s), d, fsm_cfg, *spans)
                states.append(s)
                continue
            dcache.begin(d_in.shape[1], d_valid)
            dl = draft(d_in, d_pos, cache=dcache, logits_to_keep=1)[:, -1].float()
            dcache.advance(d_in.shape[1])
            masks.append(allowed(s, j))
            dl = constrain(dl, s, masks[-1])
            if greedy:
                d = dl.argmax(-1)
            else:
                q = probabilities(dl, config)
                d = _draw(q, generator)
                qs.append(q)
            guesses.append(d)
            s = fsm.advance(dict(s), d, fsm_cfg, *spans)
            states.append(s)
            d_in, d_pos, d_valid = both(d)[:, None], (pos + j + 1)[:, None], None
        D = torch.stack(guesses, 1)  # (B, k)
        # ---- the model scores the last token and the k guesses in one pass
        t0 = tcache.length
        tcache.begin(k + 1)
        tl = model(torch.cat([last[:, None], both(D)], 1), pos[:, None] + arange, cache=tcache).float()
        tcache.advance(k + 1)
        masks.append(allowed(states[k], k))
        target = tl[:B]  # (B, k + 1, V): what plain decoding samples from at each position, as `constrain`
        if guided:
            unc = tl[B:]
            in_span = torch.stack([fsm.in_span(s_) for s_ in states], 1)[..., None]
            target = torch.where(in_span, unc + cfg_scale * (target - unc), target)
        target = target.masked_fill(~torch.stack(masks, 1), float("-inf"))
        if greedy:
            best = target.argmax(-1)  # (B, k + 1)
            n = (best[:, :k] == D).long().cumprod(1).sum(1)
            x = best.gather(1, n[:, None])[:, 0]
        else:
            P = probabilities(target.flatten(0, 1), config).view(target.shape)  # (B, k + 1, V)
            Q = torch.stack(qs + [torch.zeros_like(qs[0])], 1)
            pd = P[:, :k].gather(2, D[:, :, None])[..., 0]
            qd = Q[:, :k].gather(2, D[:, :, None])[..., 0]
            u = _uniform(B, k, generator, device)
            n = (u * qd < pd).long().cumprod(1).sum(1)
            at = n[:, None, None].expand(-1, 1, P.shape[2])
            x = _draw(residual(P.gather(1, at)[:, 0], Q.gather(1, at)[:, 0]), generator)
        if lookup and draft.jacobi:  # predicted after the rejected guess: position n + 1 on, as next guesses
            pred = (best if greedy else target.argmax(-1)).tolist()
            ahead = [pred[i][int(n[i]) + 1 :] for i in range(B)]
        # ---- the FSM state each row's kept tokens lead to, then its new token
        pre = torch.stack([s_["state"] for s_ in states], 1)  # (B, k + 1): the state before each token
        st = {key: torch.stack([s_[key] for s_ in states], 1).gather(1, n[:, None])[:, 0] for key in st}
        x = torch.where(st["state"] == DONE, pad_id, x)
        st = fsm.advance(st, x, fsm_cfg, *spans)
        toks = torch.cat([D, D[:, :1]], 1).scatter(1, n[:, None], x[:, None])  # kept guesses, then x
        n_rounds += 1
        live = [i for i in range(B) if not finished[i]]
        n_drafted += k * len(live)
        n_accepted += int(n[live].sum()) if live else 0
        if stats is not None:  # kept current: a consumer may stop early (a stream at its end of text)
            stats.update(rounds=n_rounds, drafted=n_drafted, accepted=n_accepted)
        tl_, pre_, n_ = toks.tolist(), pre.tolist(), n.tolist()
        for i in live:
            for j in range(n_[i] + 1):
                if pre_[i][j] == DONE or len(outs[i]) >= max_new_tokens:
                    finished[i] = True
                    break
                outs[i].append(tl_[i][j])
            if len(outs[i]) >= max_new_tokens or int(st["state"][i]) == DONE:
                finished[i] = True
        emitted = torch.tensor([len(o) for o in outs], device=device)
        # ---- roll both caches back to the kept tokens; finished rows keep nothing more
        done_rows = both(torch.tensor(finished, device=device))
        nR = both(n)
        tcache.keep(t0, torch.where(done_rows, 0, nR + 1))  # last and the kept guesses
        if dcache is not None:
            dcache.keep(d0, torch.where(done_rows, 0, int(two) + 1 + nR.clamp(max=k - 1)))
        carry, carry_ok = both(D[:, -1]), (nR == k) & ~done_rows
        last, pos = both(x), torch.where(done_rows, pos, pos + nR + 1)
        # ---- yield every step that all unfinished rows have reached
        if all(finished):
            ready = max(len(o) for o in outs)
        else:
            ready = min(len(outs[i]) for i in range(B) if not finished[i])
        for step in range(sent, ready):
            yield torch.tensor([o[step] if step < len(o) else pad_id for o in outs], device=device)
        sent = max(sent, ready)
        if all(finished):
            return
