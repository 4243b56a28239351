"""Weighted mixtures of shard sets for pretraining: `--data caption=DIR1:0.45 --data text=DIR2:0.55`.

`--data DIR` alone is one shard set, read by `PackedLoader` exactly as before. Named sets (`NAME=DIR:WEIGHT`,
every `--data` named) are a mixture, read by `MixtureLoader`:

- Each set is one shard directory from `tessera data pretokenize` (any run), and every set must have been
  tokenized with the run's bundle (`tokenizer_hash` in its manifest): the same ids must mean the same tokens.
- Sampling: window g of the global stream comes from set k with probability weight_k / sum(weights), drawn
  independently for every window from a counter-based hash of (seed, g), so the choice is a pure function of
  the seed and the window's place in the stream (two runs draw the same sets; a resume needs no extra state).
  The window is then the next window of that set's own packed stream (`PackedLoader`'s planning: its own
  documents, epochs, look-ahead buffer and source weights, seeded from (seed, set name)). A set that runs out
  of documents starts its next epoch in a new order. So a window holds documents of one set only, and the
  per-set loss is a sum over rows.
- Data parallelism as in `PackedLoader`: every rank plans every window (which set, which pieces) and rank r
  reads only windows g = r (mod world), so ranks get disjoint windows and a global batch is the same for
  any number of ranks. Each rank plans to the end of the global batch (the windows the other ranks read
  too), so between batches every rank's state is the same: the stream's position.
- Resume: the state is the stream position, each set's `PackedLoader` state, and the windows taken from each
  set (a global count the trainer adds after each step); `RankStates.load_rank_states` restores it, for the
  same or another number of ranks (then the next global batch is windows [w, w + batch x the new world)).

Set names sort the sets (the `--data` order does not matter). `MixtureMeter` turns each step's rows into the
per-set metrics (`data/NAME/weight`, `epochs`, `tokens`, `loss`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tessera.errors import TesseraError
from tessera.tokenizers.layout import VocabLayout
from tessera.train.loader import _MASK64, LoaderConfig, PackedLoader, RankStates, _mix64
from tessera.train.shards import data_fingerprint, read_manifest

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
SYNTAX = "--data DIR (one shard set) or --data NAME=DIR:WEIGHT, repeated (a mixture)"


class MixtureError(TesseraError):
    pass


@dataclass(frozen=True)
class ShardSet:
    name: str | None  # None: the one unnamed set of `--data DIR`
    dir: Path
    weight: float = 1.0  # as given; the share is weight / sum(weights)

    @property
    def label(self) -> str:
        return str(self.dir) if self.name is None else f"{self.name}={self.dir}:{self.weight:g}"


# -------------------------------------------------------------------------------------------- parsing
def _parse_one(value: str) -> ShardSet:
    head, eq, rest = value.partition("=")
    if not eq or not NAME.fullmatch(head):
        return ShardSet(None, Path(value))  # a path; one containing '=' after a name-like part: write ./NAME=...
    path, colon, w = rest.rpartition(":")
    if not colon or not path:
        raise MixtureError(f"--data {value}: a named set is NAME=DIR:WEIGHT, and the weight is missing")
    try:
        weight = float(w)
    except ValueError:
        weight = math.nan
    if not (math.isfinite(weight) and weight > 0):
        raise MixtureError(f"--data {value}: the weight {w!r} of {head!r} is not a positive number")
    return ShardSet(head, Path(path), weight)


def parse_data(values: str | os.PathLike | list) -> list[ShardSet]:
    """`--data` values -> the shard sets, sorted by name (one unnamed set for `--data DIR`)."""
    if isinstance(values, (str, os.PathLike)):
        values = [values]
    values = [str(v) for v in values]
    if not values:
        raise MixtureError(f"no --data: give {SYNTAX}")
    sets = [_parse_one(v) for v in values]
    unnamed = [s for s in sets if s.name is None]
    if unnamed and len(unnamed) < len(sets):
        raise MixtureError(f"--data mixes named sets and unnamed ones ({', '.join(str(s.dir) for s in unnamed)}): "
                           f"give every set as NAME=DIR:WEIGHT, or one DIR alone")
    if len(unnamed) > 1:
        raise MixtureError(f"--data given {len(unnamed)} times without names: a mixture names each set and its "
                           f"weight, NAME=DIR:WEIGHT (e.g. --data text={unnamed[0].dir}:0.5)")
    names = [s.name for s in sets]
    dups = sorted({n for n in names if n is not None and names.count(n) > 1})
    if dups:
        raise MixtureError(f"--data names {', '.join(dups)} more than once: each set needs its own name")
    return sorted(sets, key=lambda s: s.name or "")


def is_mixture(sets: list[ShardSet]) -> bool:
    return sets[0].name is not None


def shares(sets: list[ShardSet]) -> list[float]:
    total = sum(s.weight for s in sets)
    return [s.weight / total for s in sets]


# ------------------------------------------------------------------------------------------- checking
def read_sets(sets: list[ShardSet], bundle_spec: dict, tokenizer: str | os.PathLike) -> list[dict]:
    """Each set's manifest, after checking that it exists, is complete and was tokenized with `bundle_spec`;
    a one-line error otherwise (naming every set whose bundle differs)."""
    manifests = []
    for s in sets:
        if not s.dir.is_dir():
            raise MixtureError(f"--data {s.label}: {s.dir} is not a directory (a shard set from "
                               f"`tessera data pretokenize`)")
        m = read_manifest(s.dir)
        if not m.get("complete"):
            raise MixtureError(f"{s.dir}: pretokenization did not finish; run `tessera data pretokenize` again to resume")
        manifests.append(m)
    want = bundle_spec["hash"]
    if not is_mixture(sets):
        if manifests[0]["tokenizer_hash"] != want:
            raise MixtureError(f"{sets[0].dir} was tokenized with bundle {manifests[0]['tokenizer_hash'][:12]}, but "
                               f"--tokenizer {tokenizer} is {want[:12]}")
        return manifests
    bad = [(s, m) for s, m in zip(sets, manifests) if m["tokenizer_hash"] != want]
    if bad:
        def what(m):
            same_vocab = m.get("layout") == bundle_spec.get("layout")
            return (f"bundle {m['tokenizer_hash'][:12]}, "
                    + ("the same vocabulary layout but other tokenizer or codec contents" if same_vocab
                       else "another vocabulary layout"))
        raise MixtureError(
            f"--data sets {', '.join(s.name for s, _ in bad)} were not tokenized with --tokenizer {tokenizer} "
            f"({want[:12]}): " + "; ".join(f"{s.name}: {what(m)}" for s, m in bad)
            + ". Every set of a mixture must share the run's bundle (vocabulary)")
    return manifests


def check_options(sets: list[ShardSet], mix: str) -> None:
    """The source weights of `--set mix=...` name the sources of one shard set; a mixture weighs whole sets."""
    if mix and is_mixture(sets):
        raise MixtureError(f"--set mix={mix} weighs the sources of one shard set; with a mixture of --data sets, "
                           f"weigh the sets (NAME=DIR:WEIGHT) and leave mix empty")


def _entries(sets: list[ShardSet], manifests: list[dict]) -> list[dict]:
    return [{"name": s.name, "dir": str(s.dir.resolve()), "weight": s.weight, "share": round(sh, 12),
             "fingerprint": data_fingerprint(m)} for s, m, sh in zip(sets, manifests, shares(sets))]


def fingerprint(sets: list[ShardSet], manifests: list[dict]) -> str:
    """One set: its manifest's fingerprint (as before mixtures). A mixture: the names, the normalized weights
    and each set's fingerprint (not the directories: moved shards are the same data)."""
    if not is_mixture(sets):
        return data_fingerprint(manifests[0])
    ident = [{k: e[k] for k in ("name", "share", "fingerprint")} for e in _entries(sets, manifests)]
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode("utf-8")).hexdigest()


def run_config(sets: list[ShardSet], manifests: list[dict]) -> dict:
    """config.json's `data` (one set: its resolved directory; a mixture: each set's name, dir, weight, share
    and fingerprint) and `data_fingerprint`."""
    data = str(sets[0].dir.resolve()) if not is_mixture(sets) else _entries(sets, manifests)
    return {"data": data, "data_fingerprint": fingerprint(sets, manifests)}


def check_resume(run: dict, sets: list[ShardSet], manifests: list[dict], out: Path) -> None:
    """Refuse to resume `run` (its config.json) on other data, saying what changed."""
    saved = run.get("data_fingerprint")
    if not saved or saved == fingerprint(sets, manifests):
        return
    old = run.get("data")
    tail = "resume with the run's --data, or start a new --out"
    if not is_mixture(sets) and not isinstance(old, list):
        raise MixtureError(f"--data {sets[0].dir} is not the data {out} was trained on ({old}; its manifest "
                           f"differs): resume with that data, or start a new --out")
    if not is_mixture(sets):
        was = ", ".join(f"{e['name']}={e['dir']}:{e['weight']:g}" for e in old)
        raise MixtureError(f"--data {sets[0].dir} is one shard set, but {out} was trained on a mixture ({was}): {tail}")
    if not isinstance(old, list):
        raise MixtureError(f"--data is a mixture ({', '.join(s.name for s in sets)}), but {out} was trained on one "
                           f"shard set ({old}): {tail}")
    before = {e["name"]: e for e in old}
    now = {e["name"]: e for e in _entries(sets, manifests)}
    changes = [f"set {n} added" for n in now if n not in before]
    changes += [f"set {n} removed" for n in before if n not in now]
    common = [n for n in now if n in before]

    def proportions(entries):  # the weights of the sets in both, normalized over those sets
        total = sum(entries[n]["weight"] for n in common)
        return [round(entries[n]["weight"] / total, 12) for n in common]

    if common and proportions(now) != proportions(before):
        changes += [f"weight of {n} {before[n]['weight']:g} -> {now[n]['weight']:g}" for n in common
                    if now[n]["weight"] != before[n]["weight"]]
    changes += [f"set {n} is other data ({now[n]['dir']}; trained on {before[n]['dir']}, whose manifest differs)"
                for n in common if now[n]["fingerprint"] != before[n]["fingerprint"]]
    raise MixtureError(f"--data is not the mixture {out} was trained on: {'; '.join(changes) or 'it differs'}: {tail}")


# --------------------------------------------------------------------------------------------- loading
def set_seed(seed: int, name: str) -> int:
    """The seed of one set's stream: its own documents' order, independent of the other sets'."""
    return int.from_bytes(hashlib.sha256(f"tessera-mixture:{seed}:{name}".encode()).digest()[:8], "little") >> 1


class MixtureLoader(RankStates):
    """Batches of packed windows for one rank, each window from one set drawn by weight. See the module
    docstring. Batches carry `set_ids` (each row's set, an index into `names`)."""

    def __init__(self, sets: list[ShardSet], cfg: LoaderConfig, layout: VocabLayout, *, rank: int = 0,
                 world_size: int = 1):
        if not is_mixture(sets):
            raise MixtureError("MixtureLoader reads named sets; one unnamed set is a PackedLoader's")
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.names = [s.name for s in sets]
        self.weights = [s.weight for s in sets]
        self.shares = shares(sets)
        self._cum = np.cumsum(self.shares)
        self._cum[-1] = 1.0
        self._key = _mix64(cfg.seed ^ 0x6D69787475726573)
        # Each set is planned as a one-rank stream: the ranks' partition is over the mixture's windows.
        self.loaders = [PackedLoader(s.dir, dataclasses.replace(cfg, seed=set_seed(cfg.seed, s.name)), layout)
                        for s in sets]
        self.window = 0  # global windows planned so far
        self.taken = [0] * len(sets)  # windows of each set in the completed steps, all ranks (see `account`)

    def set_of(self, g: int) -> int:
        """The set of global window g: a pure function of (seed, g)."""
        u = (_mix64((self._key + g * 0x9E3779B97F4A7C15) & _MASK64) >> 11) * 2.0**-53
        return int(np.searchsorted(self._cum, u, side="right"))

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's rows of the next global batch: windows [w, w + batch_size x world) of the stream, of which
        rank r reads those g = r (mod world), batch_size of them whatever w is. Every rank plans the whole
        global batch, so after each batch all ranks are at the same place in every set."""
        rows = []
        end = self.window + self.cfg.batch_size * self.world
        while self.window < end:
            g = self.window
            k = self.set_of(g)
            pieces = self.loaders[k].plan()  # a training stream never ends: a set starts its next epoch
            self.window += 1
            if g % self.world == self.rank:
                w = self.loaders[k].materialize(pieces)
                w["set_ids"] = np.asarray(k, dtype=np.int64)
                rows.append(w)
        return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}

    def __iter__(self):
        while True:
            yield self.next_batch()

    def account(self, windows: list[int]) -> None:
        """Add a step's windows per set, summed over all ranks (the trainer's reduced sums)."""
        self.taken = [a + int(b) for a, b in zip(self.taken, windows)]

    def epochs(self, k: int) -> float:
        """Epochs of set k so far, fractional: the documents packed into its windows over its documents."""
        return self.loaders[k].epochs()

    def describe(self) -> str:
        return ", ".join(f"{n} {sh:.3g} ({ld.reader.n_docs} docs, {ld.reader.dir})"
                         for n, sh, ld in zip(self.names, self.shares, self.loaders))

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "mixture": [[n, w] for n, w in zip(self.names, self.weights)],
            "sets": {n: ld.state_dict() for n, ld in zip(self.names, self.loaders)},
            "window": self.window,
            "taken": dict(zip(self.names, self.taken)),
            "world_size": self.world,
            "rank": self.rank,
            "seed": self.cfg.seed,
        }

    def load_state_dict(self, st: dict, any_world: bool = False) -> None:
        if "sets" not in st:
            raise MixtureError("this loader state is one shard set's, not a mixture's: resume with the run's --data")
        if st.get("seed") != self.cfg.seed:
            raise MixtureError(f"loader state was saved with seed {st.get('seed')}, not {self.cfg.seed}")
        saved_world = int(st.get("world_size", self.world))
        if saved_world != self.world and not any_world:
            raise MixtureError(f"loader state was saved by one of {saved_world} ranks, not of {self.world}")
        if sorted(st["sets"]) != self.names:
            raise MixtureError(f"loader state holds the sets {sorted(st['sets'])}, not {self.names}")
        for n, ld in zip(self.names, self.loaders):
            ld.load_state_dict(st["sets"][n])
        self.window = int(st["window"])
        self.taken = [int(st.get("taken", {}).get(n, 0)) for n in self.names]


def make_loader(sets: list[ShardSet], cfg: LoaderConfig, layout: VocabLayout, *, rank: int = 0,
                world_size: int = 1) -> PackedLoader | MixtureLoader:
    if is_mixture(sets):
        return MixtureLoader(sets, cfg, layout, rank=rank, world_size=world_size)
    return PackedLoader(sets[0].dir, cfg, layout, rank=rank, world_size=world_size)


# --------------------------------------------------------------------------------------------- metrics
class MixtureMeter:
    """Per-set sums of a step, reduced with the trainer's own sums, and the per-set fields of the log.

    Per micro-batch, `sums(losses, batch)` is 3 x sets numbers: the cross-entropy summed over each set's rows
    (`ce_row` of `token_losses`: one reduction of the per-token losses already computed), their target tokens,
    and the set's windows. The trainer all-reduces them with its sums, then `update` adds the windows to the
    loader's counts (every step: the data was consumed) and the losses to the log window (finite steps)."""

    def __init__(self, loader: MixtureLoader, seq_len: int):
        self.loader, self.seq_len = loader, seq_len
        self.n = len(loader.names)
        self.width = 3 * self.n
        self._window = torch.zeros(self.width, dtype=torch.float64)

    def sums(self, losses: dict, batch: dict) -> torch.Tensor:
        ids = batch["set_ids"]
        ce = torch.zeros(self.n, dtype=torch.float64, device=ids.device)
        ce.index_add_(0, ids, losses["ce_row"].detach().double())
        count = torch.zeros(self.n, dtype=torch.float64, device=ids.device)
        count.index_add_(0, ids, losses["n_row"].double())
        return torch.cat([ce, count, torch.bincount(ids, minlength=self.n).double()])

    def update(self, reduced: torch.Tensor, finite: bool) -> None:
        v = reduced.detach().double().cpu()
        self.loader.account(v[2 * self.n:].round().long().tolist())
        if finite:
            self._window += v

    def record(self) -> dict:
        """The per-set fields for a log line (the loss over the steps since the last one), then a new window."""
        rec = {}
        ce, count = self._window[: self.n], self._window[self.n : 2 * self.n]
        for k, name in enumerate(self.loader.names):
            p = f"data/{name}/"
            rec[p + "weight"] = self.loader.shares[k]
            rec[p + "epochs"] = self.loader.epochs(k)
            rec[p + "tokens"] = self.loader.taken[k] * self.seq_len
            if count[k] > 0:
                rec[p + "loss"] = (ce[k] / count[k]).item()
        self._window.zero_()
        return rec
