"""`DataModule`: a process's view of the data (sources, tokenizer, shares) and its batch iterators.

The global batch at step k is the concatenation, in share order, of one [batch_size / R, ...]
batch from each of the R data shares (`data.shares`; default gcd(batch_size, 8), or the
process count when that does not divide it). Process p, holding batch block q, runs shares
q*R/P .. (q+1)*R/P - 1 and reads only their records and rows. So for a fixed R the global batch
at step k is a pure function of the config, the seed and k, whatever the number of processes
(any divisor of R: by default 1, 2, 4 or 8), the mesh or the tokenizer workers; changing R
changes which records each share reads, hence the batches (each epoch still covers every record
once).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from llmjax.config import Config, ConfigError
from llmjax.data.stream.grain_pipeline import StreamSpec, concat_batches, local_shares, share_batches
from llmjax.data.stream.row_objectives import Objective, example_spec
from llmjax.data.stream.sources import Source, probe, resolve_sources
from llmjax.data.tokenizers.tokenizer import Tokenizer, check_vocab, resolve_tokenizer
from llmjax.errors import DataError, find_data_error

log = logging.getLogger(__name__)

STATE_FORMAT = 2
_META_KEYS = ("_source", "_tokens", "_doc")
MIXING_BATCHES = 64  # batches the training iterator measures mixing on (`BatchIterator.mixing`)


class BatchIterator:
    """This process's part of global batches k = step, step+1, ...; resumable per share.

    `next()` returns a dict of numpy arrays [batch_size / P, ...] (the objective's fields).
    The state holds, per share, grain's iterator state and the tokens read per source. `groups[s]`
    maps record indices of source s to the file (group) they come from; the first `mixing_batches`
    batches are measured for `mixing()`.
    """

    def __init__(self, iterators: dict[int, Any], names: list[str], fingerprint: str, shares: int,
                 groups: list[Any] | None = None, mixing_batches: int = MIXING_BATCHES):
        self._its = iterators
        self._names = names
        self.fingerprint, self.shares = fingerprint, shares
        self.step = 0
        self._tokens = {r: np.zeros(len(names), np.int64) for r in iterators}
        self._groups, self._mixing_left = groups, mixing_batches if groups else 0
        self._mix: list[tuple[int, float]] = []
        self._prev_files: set[tuple[int, int]] | None = None
        self._files: list[int] = []

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts, metas = [], []
        for r, it in self._its.items():
            try:
                b = next(it)
            except StopIteration:
                raise
            except Exception as e:
                err = find_data_error(e)
                if err is not None:
                    raise DataError(str(err)) from None
                raise
            np.add.at(self._tokens[r], b["_source"], b["_tokens"])
            parts.append({k: v for k, v in b.items() if k not in _META_KEYS})
            metas.append(b)
        self.step += 1
        if self._mixing_left > 0:
            self._mixing_left -= 1
            self._measure(np.concatenate([m["_source"] for m in metas]), np.concatenate([m["_doc"] for m in metas]))
        return concat_batches(parts)

    def _measure(self, sources: np.ndarray, docs: np.ndarray) -> None:
        """sources: int32 [b]; docs: int64 [b, raw_length] (-1 on padding)."""
        from llmjax.data.stream.stages import DOCS_PER_RECORD

        real = docs >= 0
        keys = (sources[:, None].astype(np.int64) << 56) + docs
        distinct = len(np.unique(keys[real]))
        assert self._groups is not None
        rows = [(s, int(self._groups[s](int(row[int(np.argmax(ok))]) // DOCS_PER_RECORD)))
                for s, row, ok in zip(sources.tolist(), docs, real, strict=True) if ok.any()]
        files = set(rows)
        self._files.append(len(files))
        same = (sum(f in self._prev_files for f in rows) / max(len(rows), 1)) if self._prev_files is not None else -1.0
        self._prev_files = files
        self._mix.append((distinct, same))

    def mixing(self) -> dict[str, float]:
        """Over the batches measured so far (this process's rows): mean distinct documents per batch, mean
        distinct files per batch (a row's file: that of its first token), and the mean share of a batch's rows
        whose file is the file of a row of the previous batch. Empty before the first measured batch."""
        if not self._mix:
            return {}
        same = [x for _, x in self._mix if x >= 0]
        return {"batches": len(self._mix), "distinct_documents": float(np.mean([d for d, _ in self._mix])),
                "distinct_files": float(np.mean(self._files)),
                "same_file_as_previous": float(np.mean(same)) if same else float("nan")}

    def source_fractions(self) -> dict[str, float]:
        """Realised share of each source in the (non-padding) tokens this process has read so far."""
        total = sum(self._tokens.values())
        assert isinstance(total, np.ndarray)  # one counter array per local iterator, and there is at least one
        s = max(int(total.sum()), 1)
        return {name: float(n) / s for name, n in zip(self._names, total, strict=True)}

    def get_state(self) -> dict[str, Any]:
        """JSON-able: {"format", "step", "shares", "fingerprint", "share_states": {r: {"grain", "tokens"}}}."""
        return {"format": STATE_FORMAT, "step": self.step, "shares": self.shares, "fingerprint": self.fingerprint,
                "share_states": {str(r): {"grain": it.get_state(), "tokens": self._tokens[r].tolist()}
                                 for r, it in self._its.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume so the next batch is the one an uninterrupted run would produce next."""
        for r, it in self._its.items():
            share = state["share_states"][str(r)]
            it.set_state(_from_json(share["grain"]))
            self._tokens[r] = np.asarray(share["tokens"], np.int64)
        self.step = int(state["step"])

    def close(self) -> None:
        for it in self._its.values():
            close = getattr(it, "close", None)
            if close is not None:
                close()


def _identity(i: int) -> int:
    return i


def _from_json(state: Any) -> Any:
    """Undo what a JSON round trip does to grain's state: ConcatThenSplit compares its remainder
    slices with a tuple, and JSON turns tuples into lists."""
    if isinstance(state, dict):
        return {k: ({kk: tuple(vv) for kk, vv in v.items()} if k == "remainder_slices" else _from_json(v))
                for k, v in state.items()}
    if isinstance(state, list):
        return [_from_json(v) for v in state]
    return state


def default_shares(batch_size: int, process_count: int) -> int:
    """gcd(batch_size, 8): the same global batches on 1, 2, 4 or 8 processes; the process count when it does not
    divide that (e.g. 16 processes)."""
    shares = math.gcd(batch_size, 8)
    return shares if shares % process_count == 0 else process_count


def resolve_shares(cfg: Config, process_count: int, saved: int | None = None) -> int:
    """data.shares, else the shares of the checkpoint being resumed, else `default_shares`."""
    shares = cfg.data.shares or saved or default_shares(cfg.train.batch_size, process_count)
    if shares % process_count:
        where = "data.shares" if cfg.data.shares else "the checkpoint's data shares"
        raise ConfigError(f"{where}={shares} is not a multiple of the process count {process_count}; set data.shares "
                          f"to a multiple of it (the data order changes with data.shares)")
    if cfg.train.batch_size % shares:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the data shares {shares} "
                          "(data.shares)")
    return shares


class DataModule:
    """Sources + tokenizer + objective for one process; hands out train iterators and eval batches.

    `block` is the contiguous block of batch_size / process_count rows of every global batch this
    process's devices hold (0 on one process); `shares` overrides the resolved share count (a
    resumed checkpoint's). `tokenizer` is the run's (e.g. the workdir copy); unset, it is resolved
    from the config. `family`: the process's model family (whose `objective` makes the examples); unset,
    one is built from `cfg.model`.
    """

    def __init__(self, cfg: Config, block: int = 0, process_count: int = 1, objective: Objective | None = None,
                 tokenizer: Tokenizer | None = None, shares: int | None = None, family: Any = None):
        t0 = time.perf_counter()
        self.cfg = cfg
        self.process_count = process_count
        self.global_batch = cfg.train.batch_size
        if process_count <= 0 or not 0 <= block < process_count:
            raise ConfigError(f"data: invalid batch block {block} of {process_count}")
        if self.global_batch % process_count:
            raise ConfigError(f"train.batch_size={self.global_batch} is not divisible by the process count "
                              f"{process_count}")
        self.shares = resolve_shares(cfg, process_count, shares)
        self.local_shares = local_shares(self.shares, block, process_count)
        self.local_batch = self.global_batch // process_count
        self.sources: list[Source] = resolve_sources(cfg)
        for s in self.sources:
            probe(s)
        self.tokenizer = tokenizer or resolve_tokenizer(cfg, self.sources)
        check_vocab(self.tokenizer, cfg)
        if objective is None:  # the model family's (next-token, masked LM, span corruption, ...)
            if family is None:  # the caller's family (the trainer's, built once), else one for cfg.model
                from llmjax.models.families import build_family

                family = build_family(cfg.model)
            objective = family.objective(cfg.data.seq_len, self.tokenizer)
        self.objective: Objective = objective
        self.raw_length = self.objective.raw_length(cfg.data.seq_len)
        for s in self.sources:
            if s.tokenizer_hash is not None and s.tokenizer_hash != self.tokenizer.file_hash():
                raise ConfigError(f"{s.key}: {s.description.split(':')[0]} was tokenized with another tokenizer "
                                  f"({s.tokenizer_dir}) than the run's {self.tokenizer.path}; leave data.tokenizer "
                                  "unset or prepare the corpus with this tokenizer")
        add_bos = cfg.data.add_bos if cfg.data.add_bos is not None else self.tokenizer.add_bos
        if add_bos and self.tokenizer.bos_id is None:
            raise ConfigError(f"data.add_bos: the tokenizer {self.tokenizer.path} has no BOS token")
        d = cfg.data
        self.spec = StreamSpec(cfg.seed, self.raw_length, d.packing, d.packing_bins, d.shuffle, d.shuffle_window,
                               d.workers, d.prefetch, bool(add_bos), self.shares, self.global_batch)
        self._check_sizes()
        self.build_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ checks and descriptions

    def _check_sizes(self) -> None:
        """Fail early when a split certainly holds fewer tokens than one global batch."""
        need = self.global_batch * self.raw_length
        for split, hint in (("train", "lower data.seq_len or train.batch_size, or use a larger corpus"),
                            ("validation", "raise data.validation_fraction, lower data.seq_len or "
                                           "train.batch_size, or disable evaluation with eval.every_steps=0")):
            if split == "validation" and self.cfg.eval.every_steps <= 0:
                continue
            bounds = [b for s in self.sources if (b := s.max_tokens(split)) is not None]
            if len(bounds) < len(self.sources):  # some source's size is unknown
                continue
            if sum(bounds) < need:
                raise ConfigError(
                    f"data: the {split} split has at most {sum(bounds)} tokens, fewer than one global batch of "
                    f"train.batch_size={self.global_batch} rows x {self.raw_length} tokens (data.seq_len="
                    f"{self.cfg.data.seq_len}); {hint}")

    @property
    def fingerprint(self) -> str:
        """A hash of everything that defines the training stream (checked when a data state is restored)."""
        d = self.cfg.data
        parts = [STATE_FORMAT, self.cfg.seed, self.spec, self.tokenizer.file_hash(), type(self.objective).__name__,
                 [(s.name, s.fingerprint, round(s.weight, 12)) for s in self.sources], d.validation_fraction]
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]

    def example_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{field: (shape, dtype)} of one example (e.g. inputs: ((seq_len,), int32))."""
        return example_spec(self.objective, self.cfg.data.seq_len)

    def batch_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{field: (shape, dtype)} of one global batch: [batch_size, ...] per example field."""
        return {k: ((self.global_batch, *s), dt) for k, (s, dt) in self.example_spec().items()}

    def describe(self) -> str:
        lines = [f"data: {s.name} ({100 * s.weight:.0f}%): {s.description}" for s in self.sources]
        t = self.tokenizer
        lines.append(
            f"data: tokenizer {t.kind} {t.path} (vocab {t.vocab_size}, eos {t.eos_id}, bos {t.bos_id}"
            f"{', added to every document' if self.spec.add_bos else ''}); packing {self.spec.packing} into rows of "
            f"{self.raw_length}; {self.shares} data share(s), this process reads {self.local_shares}; "
            f"{self.spec.workers} tokenizer worker(s) per source and share")
        return "\n".join(lines)

    # ------------------------------------------------------------------ iterators

    def train_iterator(self, state: dict[str, Any] | None = None,
                       mixing_batches: int = MIXING_BATCHES) -> BatchIterator:
        """This process's part of the training batches, from the start or from a saved `state`; the first
        `mixing_batches` are measured (`BatchIterator.mixing`)."""
        its = {r: iter(share_batches(self.sources, self.tokenizer, self.objective, self.spec, r, True))
               for r in self.local_shares}
        groups = [getattr(s.train, "group", _identity) for s in self.sources]
        it = BatchIterator(its, [s.name for s in self.sources], self.fingerprint, self.shares, groups,
                           mixing_batches)
        if state is not None:
            it.set_state(state)
        return it

    def restore_iterator(self, state: dict[str, Any] | None, step: int) -> tuple[BatchIterator, str | None]:
        """The training iterator for a resume at `step` from a checkpoint's data `state`.

        Returns (iterator, note): the note says why the stream restarts from its beginning
        (no state, an older format, or a data configuration that changed), else None.
        """
        if state is None or state.get("format") != STATE_FORMAT:
            note = None if step == 0 else "the checkpoint has no data iterator state of this llmjax version"
            return self.train_iterator(), note
        if state.get("fingerprint") != self.fingerprint:
            return self.train_iterator(), "the data configuration changed since the checkpoint was written"
        return self.train_iterator(state), None

    @property
    def num_eval_batches(self) -> int:
        """Global eval batches per evaluation (eval.batches; 0 = the whole validation split)."""
        return self.cfg.eval.batches

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        """The first `eval.batches` global validation batches (fixed order); this process's [B/P, ...] part.

        Each share reads its part of the validation split, as in training; a split with fewer records than
        shares (a few small validation files) is read as one stream instead, every process taking its rows of
        each global batch, so no share is left without rows and the batches still do not depend on P."""
        names = [s.name for s in self.sources]
        if any(len(s.validation) < self.shares for s in self.sources):
            one = dataclasses.replace(self.spec, shares=1)
            it = BatchIterator({0: iter(share_batches(self.sources, self.tokenizer, self.objective, one, 0, False))},
                               names, self.fingerprint, 1)
            lo = self.local_shares[0] * self.global_batch // self.shares
            part: Any = lambda b: {k: v[lo:lo + self.local_batch] for k, v in b.items()}  # noqa: E731
        else:
            its = {r: iter(share_batches(self.sources, self.tokenizer, self.objective, self.spec, r, False))
                   for r in self.local_shares}
            it = BatchIterator(its, names, self.fingerprint, self.shares)
            part = lambda b: b  # noqa: E731
        n, k = self.num_eval_batches, 0
        try:
            while n <= 0 or k < n:
                try:
                    batch = next(it)
                except StopIteration:
                    return
                k += 1
                yield part(batch)
        finally:
            it.close()
