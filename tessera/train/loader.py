"""The pretraining loader: memory-mapped shards -> packed, document-masked windows.

Documents are drawn per source with mixture weights (`--mix caption=2,draw=1`; by default each source in
proportion to its documents), each source walked in a fresh pseudo-random order every epoch. The order is a
keyed Feistel permutation computed on the fly: nothing of size O(corpus) is ever held in memory, and the
loader's whole state is a few counters and an RNG state (JSON), so it resumes exactly. (Several shard sets
mixed by weight, `--data NAME=DIR:WEIGHT`: `train/mixture.py`, one of these loaders per set.)

Packing: windows of `seq_len + 1` tokens (inputs and shifted targets). A short look-ahead buffer of documents
is packed first-fit; a document that fits nowhere waits for the next window, and the rest of the window is
padding (masked). Only a document longer than a whole window is split, at the largest point that does not
fall inside an image span (audio spans split only at frame boundaries). Every piece restarts its positions
at 0, and `doc_ids` keeps attention inside it.

Conditioning dropout: with probability `cond_dropout`, a document whose last span (image or audio) is a
training target loses everything between `<s>` and that span, so the model also learns the unconditional
distribution that classifier-free guidance subtracts at generation time.

Data parallelism: all ranks plan the same global stream of windows; rank r materializes windows
r, r + world, r + 2*world, ... So a global batch is the same set of windows for any number of ranks, and
N processes reproduce one process with N-fold gradient accumulation.

Resume: each rank's state is its own position in the global stream (rank r has planned the stream up to
its last window, so the ranks' counters differ), and a run saves every rank's state. `load_rank_states`
restores each rank's own; with a different number of ranks every rank continues from the state furthest
along, the first window no rank has taken, so no window is repeated or skipped (see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tessera.errors import TesseraError
from tessera.tokenizers.layout import VocabLayout
from tessera.train.shards import ShardReader

IGNORE = -100
_MASK64 = (1 << 64) - 1


def parse_mix(spec: str | dict | None) -> dict[str, float] | None:
    """'a=5,b=1' -> {'a': 5.0, 'b': 1.0}."""
    if spec is None or isinstance(spec, dict):
        return spec
    out = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise TesseraError(f"--mix entry {part!r} is not source=weight")
        k, v = part.split("=", 1)
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise TesseraError(f"--mix weight {v!r} for {k!r} is not a number") from None
        if out[k.strip()] < 0:
            raise TesseraError(f"--mix weight for {k!r} is negative")
    return out


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a well-mixed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Permutation:
    """A keyed pseudo-random permutation of range(n) in O(1) memory (Feistel network + cycle walking)."""

    def __init__(self, n: int, key: int, rounds: int = 4):
        self.n = n
        self.half = max(1, ((max(n - 1, 1)).bit_length() + 1) // 2)
        self.mask = (1 << self.half) - 1
        self.keys = [_mix64(key * 0x632BE59BD9B4E019 + r) for r in range(rounds)]

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        x = self._encrypt(i)
        while x >= self.n:  # the domain is < 4n, so this ends after few steps on average
            x = self._encrypt(x)
        return x


@dataclass
class LoaderConfig:
    seq_len: int = 512
    batch_size: int = 8  # windows per rank per micro-step
    seed: int = 0
    mix: dict[str, float] | None = None
    cond_dropout: float = 0.0
    lookahead: int = 64


@dataclass
class _Piece:
    doc: int
    drop: int  # 0: the whole document; p > 0: <s> followed by the document from position p
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


class _MixtureStream:
    """Endless documents: source by weight, then that source's next document in its epoch's permutation."""

    def __init__(self, reader: ShardReader, weights: dict[str, float] | None, seed: int):
        self.reader = reader
        self.seed = seed
        counts = {s: len(reader.source_docs(i)) for i, s in enumerate(reader.sources)}
        if weights is None:
            weights = {s: float(n) for s, n in counts.items()}
        unknown = sorted(set(weights) - set(counts))
        if unknown:
            raise TesseraError(f"--mix names unknown source(s) {unknown}; the shards have {sorted(counts)}")
        self.sources = [i for i, s in enumerate(reader.sources) if weights.get(s, 0) > 0 and counts[s] > 0]
        if not self.sources:
            raise TesseraError("no documents to draw: every source is empty or has weight 0")
        w = np.asarray([weights[reader.sources[i]] for i in self.sources], dtype=np.float64)
        self.probs = w / w.sum()
        self.docs = {i: reader.source_docs(i) for i in self.sources}
        self.pos = {i: [0, 0] for i in self.sources}  # epoch, cursor
        self._perm: dict[int, tuple[int, Permutation]] = {}

    def next(self, rng: np.random.Generator) -> int:
        s = self.sources[int(rng.choice(len(self.sources), p=self.probs))] if len(self.sources) > 1 else self.sources[0]
        epoch, cursor = self.pos[s]
        docs = self.docs[s]
        if self._perm.get(s, (None,))[0] != epoch:
            self._perm[s] = (epoch, Permutation(len(docs), key=(self.seed * 1_000_003 + s) * 1_000_003 + epoch))
        doc = int(docs[self._perm[s][1](cursor)])
        cursor += 1
        self.pos[s] = [epoch + 1, 0] if cursor == len(docs) else [epoch, cursor]
        return doc

    def drawn(self) -> tuple[int, int]:
        """(documents drawn so far, documents per epoch), over the sources drawn from."""
        return (sum(e * len(self.docs[s]) + c for s, (e, c) in self.pos.items()),
                sum(len(self.docs[s]) for s in self.sources))

    def state(self) -> dict:
        return {str(k): v for k, v in self.pos.items()}

    def load(self, st: dict) -> None:
        for k, v in st.items():
            if int(k) in self.pos:
                self.pos[int(k)] = list(v)


class _SequentialStream:
    """Every document once, in order (held-out evaluation)."""

    def __init__(self, reader: ShardReader):
        self.n, self.i = reader.n_docs, 0

    def next(self, rng) -> int | None:
        if self.i >= self.n:
            return None
        self.i += 1
        return self.i - 1

    def state(self) -> dict:
        return {"i": self.i}

    def load(self, st: dict) -> None:
        self.i = st["i"]


class RankStates:
    """`load_rank_states` for a loader whose state has `window` (its position in the global stream) and whose
    `load_state_dict(state, any_world)` refuses another world size unless told."""

    world: int
    rank: int

    def load_rank_states(self, states: list[dict]) -> bool:
        """Restore this rank's state from the states of every rank of a saved run (in rank order).

        The same number of ranks: each rank takes its own, and the run goes on exactly as if never stopped.
        Another number: every rank takes the state furthest along the stream. After n windows per rank, the
        last rank of a W-rank run has planned windows 0 .. nW-1, exactly the ones taken, so its state is
        the stream's position; from it rank r of W' ranks takes the windows g >= nW with g = r (mod W'). Each
        global batch is still one contiguous block of the global stream (a window may sit on another rank
        than in a run of W' ranks from the start), none repeated or skipped. Returns True when the states
        were re-partitioned that way.
        """
        if not states:
            raise TesseraError("no loader state to restore")
        if len(states) == self.world:
            self.load_state_dict(states[self.rank])
            return False
        furthest = max(states, key=lambda st: int(st["window"]))
        self.load_state_dict(furthest, any_world=True)
        return True


class PackedLoader(RankStates):
    """Iterates batches of packed windows for one rank. See the module docstring."""

    def __init__(self, shards: str | ShardReader, cfg: LoaderConfig, layout: VocabLayout, *, rank: int = 0,
                 world_size: int = 1, sequential: bool = False):
        self.reader = shards if isinstance(shards, ShardReader) else ShardReader(shards)
        self.cfg, self.layout = cfg, layout
        self.rank, self.world = rank, world_size
        self.cap = cfg.seq_len + 1
        self.rng = np.random.Generator(np.random.PCG64(cfg.seed))
        self.stream = _SequentialStream(self.reader) if sequential else _MixtureStream(self.reader, cfg.mix, cfg.seed)
        self.sequential = sequential
        self.cond_dropout = 0.0 if sequential else cfg.cond_dropout
        self.buffer: list[_Piece] = []
        self.window = 0  # global windows planned so far
        self.stats = {"dropped_long_span": 0, "cond_dropped": 0, "split_docs": 0, "pad_tokens": 0, "tokens": 0}
        self._openers = np.asarray([layout.boi, layout.boa], dtype=np.int64)
        self._exhausted = False

    # ------------------------------------------------------------------------------------ documents
    def _effective(self, p: _Piece) -> tuple[np.ndarray, np.ndarray]:
        tokens, mask = self.reader.doc(p.doc)
        if p.drop:
            tokens = np.concatenate([tokens[:1], tokens[p.drop:]])
            mask = np.concatenate([mask[:1], mask[p.drop:]])
        return tokens, mask

    def _draw(self) -> _Piece | None:
        doc = self.stream.next(self.rng)
        if doc is None:
            return None
        n = self.reader.doc_len(doc)
        drop = 0
        if self.cond_dropout > 0 and self.rng.random() < self.cond_dropout:
            tokens, mask = self.reader.doc(doc)
            where = np.nonzero(np.isin(tokens, self._openers))[0]
            if len(where) and where[-1] > 1 and mask[where[-1]]:
                drop = int(where[-1])
                self.stats["cond_dropped"] += 1
        length = n if not drop else 1 + n - drop
        return _Piece(doc, drop, 0, length)

    def _fill_buffer(self) -> None:
        while len(self.buffer) < self.cfg.lookahead and not self._exhausted:
            p = self._draw()
            if p is None:
                self._exhausted = True
            elif p.length >= 2:
                self.buffer.append(p)

    def _largest_cut(self, p: _Piece, limit: int) -> int:
        """The largest c <= limit such that cutting the piece before its c-th token splits no image span
        and cuts audio spans only at frame boundaries; 0 if there is none (>= 2 tokens)."""
        tokens, _ = self._effective(p)
        t = tokens[p.start : p.end].astype(np.int64)
        L = self.layout
        ok = np.ones(len(t) + 1, dtype=bool)
        for opener, closer, frame in ((L.boi, L.eoi, 0), (L.boa, L.eoa, L.audio_levels)):
            starts = np.nonzero(t == opener)[0]
            ends = np.nonzero(t == closer)[0]
            for s in starts:
                after = ends[ends > s]
                e = int(after[0]) if len(after) else len(t)  # a span cut by an earlier split runs to the end
                inside = np.arange(s + 1, e + 1)
                if frame:
                    inside = inside[(inside - (s + 1)) % frame != 0]
                ok[inside] = False
            if len(ends) and (not len(starts) or ends[0] < starts[0]):
                # the piece starts inside a span whose opener an earlier split left behind
                first = int(ends[0])
                inside = np.arange(0, first + 1)
                if frame:
                    inside = inside[inside % frame != 0]
                ok[inside] = False
        ok[0] = ok[1] = False
        cand = np.nonzero(ok[: limit + 1])[0]
        return int(cand[-1]) if len(cand) else 0

    # -------------------------------------------------------------------------------------- packing
    def _plan_window(self) -> list[_Piece] | None:
        pieces: list[_Piece] = []
        filled = 0
        while filled < self.cap:
            self._fill_buffer()
            if not self.buffer:
                break
            room = self.cap - filled
            idx = next((i for i, p in enumerate(self.buffer) if p.length <= room), None)
            if idx is not None:
                p = self.buffer.pop(idx)
                pieces.append(p)
                filled += p.length
                continue
            head = self.buffer[0]
            if head.length <= self.cap:
                break  # it fits an empty window: pad this one and place it next time
            cut = self._largest_cut(head, room)
            if cut:
                pieces.append(_Piece(head.doc, head.drop, head.start, head.start + cut))
                if head.start == 0:
                    self.stats["split_docs"] += 1
                head.start += cut
                filled += cut
            elif filled == 0:
                self.buffer.pop(0)  # an image span longer than a window: it can never be placed
                self.stats["dropped_long_span"] += 1
            else:
                break
        return pieces or None

    def _materialize(self, pieces: list[_Piece]) -> dict[str, np.ndarray]:
        cap = self.cap
        ids = np.full(cap, self.layout.pad, dtype=np.int64)
        mask = np.zeros(cap, dtype=bool)
        pos = np.zeros(cap, dtype=np.int64)
        doc = np.full(cap, -1, dtype=np.int64)
        o = 0
        for k, p in enumerate(pieces):
            tokens, m = self._effective(p)
            n = p.length
            ids[o : o + n] = tokens[p.start : p.end]
            mask[o : o + n] = m[p.start : p.end].astype(bool)
            pos[o : o + n] = np.arange(n)
            doc[o : o + n] = k
            o += n
        # padding: one more document after the real ones, so no real token attends to it; it has no targets
        doc[o:] = len(pieces)
        pos[o:] = np.arange(cap - o)
        self.stats["pad_tokens"] += cap - o
        self.stats["tokens"] += cap
        same_doc = doc[1:] == doc[:-1]
        targets = np.where(mask[1:] & same_doc & (doc[1:] < len(pieces)), ids[1:], IGNORE)
        return {"input_ids": ids[:-1], "targets": targets, "positions": pos[:-1], "doc_ids": doc[:-1]}

    def plan(self) -> list[_Piece] | None:
        """The next window of the global stream, planned (which pieces) but not read; None at the end of a
        sequential pass. Every rank plans every window; `materialize` reads only its own."""
        pieces = self._plan_window()
        if pieces is not None:
            self.window += 1
        return pieces

    def materialize(self, pieces: list[_Piece]) -> dict[str, np.ndarray]:
        """A planned window's arrays (inputs, targets, positions, document ids)."""
        return self._materialize(pieces)

    def next_window(self) -> dict[str, np.ndarray] | None:
        """This rank's next window, or None when a sequential pass is over."""
        while True:
            g = self.window
            pieces = self.plan()
            if pieces is None:
                return None
            if g % self.world == self.rank:
                return self.materialize(pieces)

    def next_batch(self) -> dict[str, torch.Tensor] | None:
        rows = []
        for _ in range(self.cfg.batch_size):
            w = self.next_window()
            if w is None:
                break
            rows.append(w)
        if not rows:
            return None
        return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}

    def __iter__(self):
        while True:
            b = self.next_batch()
            if b is None:
                return
            yield b

    def epochs(self) -> float:
        """Epochs of the training stream so far, fractional: documents drawn and not waiting in the look-ahead
        buffer, over the documents of the sources drawn from (a set that runs out starts its next epoch)."""
        drawn, total = self.stream.drawn()
        return (drawn - len(self.buffer)) / total

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "rng": self.rng.bit_generator.state,
            "stream": self.stream.state(),
            "buffer": [[p.doc, p.drop, p.start, p.end] for p in self.buffer],
            "window": self.window,
            "exhausted": self._exhausted,
            "stats": dict(self.stats),
            "world_size": self.world,
            "rank": self.rank,
            "seed": self.cfg.seed,
        }

    def load_state_dict(self, st: dict, any_world: bool = False) -> None:
        """Restore a state saved by `state_dict`. A state saved by a rank of another world size would map the
        stream's windows to the wrong ranks and is refused unless `any_world` (see `load_rank_states`)."""
        if st.get("seed") != self.cfg.seed:
            raise TesseraError(f"loader state was saved with seed {st.get('seed')}, not {self.cfg.seed}")
        saved_world = int(st.get("world_size", self.world))
        if saved_world != self.world and not any_world:
            raise TesseraError(f"loader state was saved by one of {saved_world} ranks, not of {self.world}")
        self.rng.bit_generator.state = st["rng"]
        self.stream.load(st["stream"])
        self.buffer = [_Piece(*p) for p in st["buffer"]]
        self.window = int(st["window"])
        self._exhausted = bool(st.get("exhausted", False))
        self.stats.update(st.get("stats", {}))
