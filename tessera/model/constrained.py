"""Constrained decoding: a finite-state machine over the vocabulary layout that keeps every span decodable.

States, per batch row (all transitions are tensor ops over the batch; no per-token Python):

    TEXT --<boi>--> H --<h:n>--> W --<w:m>--> CODES (n*m image codes) --> END --<eoi>--> TEXT (or DONE)
    TEXT --<boa>--> AUDIO (level q = 0, 1, ..., n_q-1, 0, ...; <eoa> only when q == 0) --<eoa>--> TEXT (or DONE)
    TEXT --</s>--> DONE

The allowed set of every state is a precomputed row of a (rows, vocab) boolean table; a step gathers one row
per batch element. Two things depend on the row's counters, and are also computed as tensor comparisons:
- the token budget: a span is only opened, and a grid size only chosen, if the whole span still fits in the
  tokens left, and an audio span is closed (<eoa> forced at a frame boundary) before the budget runs out;
- `max_audio_frames`: <eoa> is forced once that many frames are written.

So a generation that stops at `max_new_tokens` never leaves a half-written span behind.

Text states never allow codes, grid tokens, closers, <s>, <pad>, reserved ids or the padding rows of the
embedding table. `output="text"` also forbids opening spans; `output="any"` lets the model choose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera.tokenizers.layout import VocabLayout

TEXT, H, W, CODES, END, AUDIO, DONE = range(7)


@dataclass
class FSMConfig:
    allow_image: bool = False  # may TEXT open an image span
    allow_audio: bool = False  # may TEXT open an audio span
    stop_after_span: bool = False  # a closed span ends the row (output="image"/"audio")
    max_grid: int = 0  # largest grid side the model may choose (0: the layout's max_grid)
    max_audio_frames: int = 0  # force <eoa> after this many frames (0: only the budget limits)


class SpanFSM:
    def __init__(self, layout: VocabLayout, eos_id: int, device="cpu", bos_id: int = 1):
        self.L = L = layout
        self.eos = eos_id
        V = layout.padded_vocab_size
        self.device = torch.device(device)
        self.nq = L.audio_levels
        rows = []

        def row(ids=(), ranges=()):
            r = torch.zeros(V, dtype=torch.bool)
            for a, b in ranges:
                r[a:b] = True
            for i in ids:
                r[i] = True
            rows.append(r)
            return len(rows) - 1

        text = L.ranges["text"]
        # Text pieces, minus BOS (a document start never appears mid-generation); EOS ends the row. A text
        # tokenizer without a BOS of its own delimits documents with its EOS (hf_text): that one stays allowed.
        self.R_TEXT = row(ranges=[(text.offset, text.end)])
        if bos_id != eos_id:
            rows[self.R_TEXT][bos_id] = False
        self.R_H = row(ranges=[(L.h_offset, L.w_offset)])
        self.R_W = row(ranges=[(L.w_offset, L.reserved_offset)])
        img = L.ranges["image"]
        self.R_CODES = row(ranges=[(img.offset, img.end)])
        self.R_END = row(ids=[L.eoi])
        self.R_AUDIO = [row(ranges=[(L.ranges[f"audio.{q}"].offset, L.ranges[f"audio.{q}"].end)]) for q in range(self.nq)]
        self.R_AUDIO0_EOA = row(ranges=[(L.ranges["audio.0"].offset, L.ranges["audio.0"].end)], ids=[L.eoa]) if self.nq else -1
        self.R_EOA = row(ids=[L.eoa])
        self.R_DONE = row(ids=[L.pad])
        self.rows = torch.stack(rows).to(self.device)
        # the table row of each state (AUDIO's depends on the level, and is chosen in `allowed`)
        self.state_row = torch.tensor([self.R_TEXT, self.R_H, self.R_W, self.R_CODES, self.R_END, self.R_DONE,
                                       self.R_DONE], device=self.device)
        self.audio_rows = torch.tensor(self.R_AUDIO or [self.R_DONE], device=self.device)
        self.grid = torch.arange(1, L.max_grid + 1, device=self.device)
        # span opened in TEXT needs at least: <boi> <h> <w> code <eoi> = 5, <boa> frame <eoa> = n_q + 2
        self.min_image_span = 5
        self.min_audio_span = self.nq + 2

    # --------------------------------------------------------------------------------------- state
    def reachable(self, cfg: FSMConfig, start_state: int) -> tuple[bool, bool]:
        """(image, audio): can a generation starting in `start_state` ever be inside such a span?

        Passed to `allowed`/`advance`, which then skip the tensor ops of spans that cannot occur."""
        image = (cfg.allow_image and self.L.has_image) or start_state in (H, W, CODES, END)
        audio = bool(self.nq) and ((cfg.allow_audio and self.L.has_audio) or start_state == AUDIO)
        return image, audio

    def init_state(self, batch: int, start_state: int, budget: int, *, remaining: int = 0) -> dict:
        z = lambda: torch.zeros(batch, dtype=torch.long, device=self.device)  # noqa: E731
        return {"state": torch.full((batch,), start_state, dtype=torch.long, device=self.device),
                "remaining": torch.full((batch,), remaining, dtype=torch.long, device=self.device),
                "h": z(), "q": z(), "frames": z(),
                "budget": torch.full((batch,), budget, dtype=torch.long, device=self.device)}

    def allowed(self, st: dict, cfg: FSMConfig, image: bool = True, audio: bool = True) -> torch.Tensor:
        """(B, vocab) boolean mask of the tokens each row may take next.

        `image`/`audio` False (see `reachable`) skip the work for spans no row can be in."""
        L, s = self.L, st["state"]
        row = self.state_row[s]
        if audio and self.nq:
            q = st["q"]
            audio_row = self.audio_rows[q.clamp(max=self.nq - 1)]
            at_boundary = q == 0
            can_close = at_boundary & (st["frames"] >= 1)
            must_close = can_close & (
                (st["budget"] < self.nq + 1) | ((cfg.max_audio_frames > 0) & (st["frames"] >= cfg.max_audio_frames)))
            audio_row = torch.where(can_close, self.R_AUDIO0_EOA, audio_row)
            audio_row = torch.where(must_close, self.R_EOA, audio_row)
            row = torch.where(s == AUDIO, audio_row, row)
        mask = self.rows[row]  # (B, V), a new tensor
        budget = st["budget"]
        # TEXT: open spans only when allowed and when a whole minimal span fits; </s> always allowed.
        in_text = s == TEXT
        mask[:, self.eos] &= in_text
        if cfg.allow_image and L.has_image:
            mask[:, L.boi] = in_text & (budget >= self.min_image_span)
        if cfg.allow_audio and L.has_audio:
            mask[:, L.boa] = in_text & (budget >= self.min_audio_span)
        if image:
            # Grid sizes: the whole span must fit the budget (and the max grid side).
            limit = cfg.max_grid or L.max_grid
            g = self.grid[None, :]  # (1, G)
            # <h:n> <w:m> + n*m codes + <eoi> must fit, with m >= 1; then <w:m> + n*m codes + <eoi>
            h_ok = (g <= limit) & (g + 3 <= budget[:, None])
            w_ok = (g <= limit) & (st["h"][:, None] * g + 2 <= budget[:, None])
            mask[:, L.h_offset : L.w_offset] &= h_ok & (s == H)[:, None]
            mask[:, L.w_offset : L.reserved_offset] &= w_ok & (s == W)[:, None]
        return mask

    def advance(self, st: dict, tok: torch.Tensor, cfg: FSMConfig, image: bool = True, audio: bool = True) -> dict:
        """Move every row's state by the token it just took (`image`/`audio` as in `allowed`)."""
        L = self.L
        s = st["state"]
        t_text = s == TEXT
        new = torch.where(t_text & (tok == self.eos), DONE, s)
        after_span = DONE if cfg.stop_after_span else TEXT
        if image:
            new = torch.where(t_text & (tok == L.boi), H, new)
            # image header
            h_val = tok - L.h_offset + 1
            st["h"] = torch.where(s == H, h_val, st["h"])
            new = torch.where(s == H, W, new)
            w_val = tok - L.w_offset + 1
            st["remaining"] = torch.where(s == W, st["h"] * w_val, st["remaining"])
            new = torch.where(s == W, CODES, new)
            # codes
            in_codes = s == CODES
            st["remaining"] = torch.where(in_codes, st["remaining"] - 1, st["remaining"])
            new = torch.where(in_codes & (st["remaining"] <= 0), END, new)
            new = torch.where((s == END) & (tok == L.eoi), after_span, new)
        if audio and self.nq:
            opened = t_text & (tok == L.boa)
            new = torch.where(opened, AUDIO, new)
            in_audio = s == AUDIO
            closed = in_audio & (tok == L.eoa)
            q_next = (st["q"] + 1) % self.nq
            st["frames"] = torch.where(in_audio & ~closed & (q_next == 0), st["frames"] + 1, st["frames"])
            st["q"] = torch.where(in_audio & ~closed, q_next, st["q"])
            st["q"] = torch.where(opened, 0, st["q"])
            st["frames"] = torch.where(opened, 0, st["frames"])
            new = torch.where(closed, after_span, new)
        st["state"] = new
        st["budget"] = st["budget"] - (s != DONE).long()
        return st

    @staticmethod
    def in_span(st: dict) -> torch.Tensor:
        s = st["state"]
        return (s != TEXT) & (s != DONE)
