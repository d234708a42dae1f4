"""Files to batches: the dataset, the collator and the epoch/batch plan.

    python data.py --data_dir D [--split dev] [--modalities mae,pose]   check every file, print a summary
                   [--annotation_file A] [--features m=PATH]          (files named explicitly: data_paths.py)
    python data.py --make_demo DIR [--demo_context]                     write the built-in demo language

Randomness inside a sample (paraphrase choice, task choice, negatives, time flip) is drawn from a
generator keyed on (seed, epoch, index), so a sample does not depend on which worker loads it or on
what was loaded before: that is what makes `--resume` exact without saving worker RNG state.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from signllava.cli import make_parser
from signllava.data_paths import DataPaths
from signllava.frames import PLAUSIBLE_FRAMES, cap_frames  # noqa: F401 (cap_frames: data.cap_frames is API)
from signllava.layout import DataError, FeatureStore, load_annotation, modality_rank
from signllava.prompts import (TASKS, PromptBuilder, carry_chance, context_ids, imperfect_context, make_task,
                               translation_prompt)
from signllava.shard_index import ABSENT, clip_keys

log = logging.getLogger("signllava")


def parse_task_weights(text: str | None) -> dict[str, float]:
    """'translation=0.7,one_word_present=0.1' -> weights; relative, need not sum to 1."""
    if not text:
        return {"translation": 1.0}
    out = {}
    for part in text.split(","):
        name, _, val = part.partition("=")
        name = name.strip()
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r} in task weights (known: {', '.join(TASKS)})")
        try:
            out[name] = float(val)
        except ValueError:
            raise ValueError(f"task weight for {name!r} is not a number: {val!r}") from None
    if not any(w > 0 for w in out.values()):
        raise ValueError("task weights: at least one task needs a positive weight")
    return out


def parse_max_frames(text: str | int | None) -> dict[str, int]:
    """'300' (every modality) or 'mae=300,sign2vec=150' (others uncapped) -> {modality or '*': cap}; 0 is no cap."""
    if text is None or text == "":
        return {}
    if isinstance(text, int):
        return {"*": text} if text else {}
    out = {}
    for part in str(text).split(","):
        name, eq, val = part.rpartition("=")
        key = name.strip() if eq else "*"
        try:
            n = int(val)
        except ValueError:
            raise ValueError(f"--max_frames: {val.strip()!r} is not a whole number (give 300 or mae=300,sign2vec=150)") from None
        if n < 0:
            raise ValueError(f"--max_frames: {part.strip()!r} is negative")
        out[key] = n
    return out


def frame_limits(spec: dict | int | None, modalities: list[str]) -> dict[str, int]:
    """Each modality's cap (0: none) from a parsed --max_frames or a config's saved value (an int in
    checkpoints written before per-modality caps)."""
    spec = parse_max_frames(spec) if not isinstance(spec, dict) else spec
    unknown = sorted(set(spec) - set(modalities) - {"*"})
    if unknown:
        raise DataError(f"--max_frames names modalities not in the data: {', '.join(unknown)} "
                        f"(modalities: {', '.join(modalities)})")
    return {m: int(spec.get(m, spec.get("*", 0))) for m in modalities}


@dataclass
class DataOptions:
    modalities: list[str] | None = None          # None: every modality folder present
    max_frames: dict | int = field(default_factory=dict)   # per modality ('*': all); 0 / missing: no cap
    frame_cap: str = "stride"                    # stride (uniform subsample) | truncate | pool (window means)
    missing_modality: str = "drop"               # a clip without one modality: drop it | absent (learned row)
    modality_dropout: float = 0.0                # training: each present modality -> absent with this chance
    absent_modalities: tuple = ()                # trained modalities never read (generation from a subset)
    max_seq_len: int = 0                         # 0: no guard; else frames capped (or clips skipped) to fit
    long_samples: str = "cap"                    # cap | skip, for clips longer than max_seq_len
    context_window: int = 0
    prelude_window: int = 0
    use_paraphrases: bool = False
    task_weights: dict = field(default_factory=lambda: {"translation": 1.0})
    max_num_words: int = 5
    seed: int = 42
    context_dropout: float = 0.0                 # training only: P(context left out)
    context_noise: float = 0.0                   # training only: P(a context sentence is corrupted)


def segment_sizes(feats: list[np.ndarray], modalities: list[str], absent) -> list[int]:
    """Positions between each segment's markers: its frames, or the one absent row."""
    return [1 if m in absent else len(f) for m, f in zip(modalities, feats)]


def capped_len(t: int, max_frames: int) -> int:
    return t if max_frames <= 0 else min(t, max_frames)


class SignDataset(torch.utils.data.Dataset):
    """Clips of one split that have features in every selected modality.

    `data` is the dataset's folder (today's layout) or a DataPaths naming its files. `expected_dims` (from a
    checkpoint) makes a dim mismatch an error; otherwise dims are read from
    the data. `context_texts` overrides the gold translations used as context (generation with
    predicted context)."""

    def __init__(self, data: DataPaths | str | Path, split: str, builder: PromptBuilder, opts: DataOptions,
                 train: bool, expected_dims: dict[str, int] | None = None):
        self.paths = DataPaths.of(data)
        self.data_dir = self.paths.data_dir
        if not self.data_dir.is_dir():
            raise DataError(f"{self.data_dir}: data directory not found")
        self.split, self.builder, self.opts, self.train = split, builder, opts, train
        self.annotation = load_annotation(self.paths.annotation(split))
        if self.annotation.resorted_videos:
            log.info("%s: clip_order of %d videos was in plain text order (x_10 before x_2); sorted naturally",
                     self.annotation.path, self.annotation.resorted_videos)
        self.context_texts: dict[tuple[str, str], str] = {k: c.translation for k, c in self.annotation.clips.items()}

        found = self.paths.metadata(split)
        wanted = opts.modalities or (list(expected_dims) if expected_dims else list(found))
        self.modalities = sorted(wanted, key=modality_rank)        # the splice order, absent ones included
        self.read_modalities = [m for m in self.modalities if m not in opts.absent_modalities]
        missing = [m for m in self.read_modalities if m not in found]
        if missing:
            raise DataError(f"{self.data_dir}: no metadata for split {split!r} in modality folder(s) {', '.join(missing)}"
                            f" (found: {', '.join(found) or 'none'})")
        if not self.read_modalities:
            raise DataError(f"{self.data_dir}: every modality ({', '.join(self.modalities)}) is marked absent")
        self.stores = {m: FeatureStore(m, found[m]) for m in self.read_modalities}
        for s in self.stores.values():
            s.check_files_present()

        # Frame counts live in one int32 array [clip, modality] (ABSENT: no features), not in dicts; modalities
        # never read (generation from a subset) are ABSENT throughout.
        items = [(v, c, pos) for v, order in self.annotation.videos.items() for pos, c in enumerate(order)]
        keys = clip_keys((v, c) for v, c, _ in items)
        frames = np.full((len(items), len(self.modalities)), ABSENT, np.int32)
        for k, m in enumerate(self.modalities):
            if m in self.stores:
                frames[:, k] = self.stores[m].index().lookup(keys)
        del keys
        keep = self._keep(items, frames)
        self.items = [items[i] for i in keep.tolist()]
        self.frames = np.ascontiguousarray(frames[keep])          # [len(self), modalities] int32
        del items, frames
        self.dims = self._read_dims(expected_dims)
        self.limits = frame_limits(opts.max_frames, self.modalities)
        self._refuse_implausible_lengths()
        self.too_long = self._apply_length_guard()
        self._text_len = np.fromiter((len(self.annotation.clips[(v, c)].translation) for v, c, _ in self.items),
                                     dtype=np.int32, count=len(self.items))
        self.vocabulary = sorted({k.lower() for ct in self.annotation.clips.values() for k in ct.keywords})
        names = list(opts.task_weights)
        w = np.asarray([opts.task_weights[t] for t in names], dtype=np.float64)
        self._tasks, self._task_p = names, w / w.sum()
        self.fixed_task: str | None = None       # generation: one task for every item
        self.generation = False                  # True: prompt ids only (answer kept in meta as the reference)
        self._context_pool: list[str] | None = None      # sentences that --context_noise draws from
        self.close()                             # reading the dims opened shards: leave nothing open to fork

    def log_task_mix(self):
        """With yes/no tasks weighted: how many clips can carry each, and the task mix that results, since a clip
        that cannot carry its drawn task (no keywords, no candidate words) becomes a translation sample. A task
        no clip can carry is a warning: its weight silently turns into translation otherwise."""
        weights = dict(zip(self._tasks, self._task_p))
        asked = [t for t, p in weights.items() if t != "translation" and p > 0]
        if not asked:
            return
        texts = [self.annotation.clips[(v, c)] for v, c, _ in self.items]
        chance = {t: np.asarray([carry_chance(t, x.translation, x.keywords, self.vocabulary, self.opts.max_num_words)
                                 for x in texts]) for t in asked}
        mix = {t: weights[t] * float(chance[t].mean()) for t in asked}
        mix = {"translation": 1.0 - sum(mix.values()), **mix}
        with_keywords = sum(bool(x.keywords) for x in texts)
        can = ", ".join(f"{t} {int((chance[t] > 0).sum())}" for t in asked)
        dead = [t for t in asked if not chance[t].any()]
        (log.warning if dead else log.info)(
            "%s/%s: task weights %s; of %d clips (%d with keywords, vocabulary of %d words) these can carry %s; the "
            "mix becomes %s%s", self.data_dir.name, self.split,
            ",".join(f"{t}={p:.3g}" for t, p in weights.items()), len(texts), with_keywords, len(self.vocabulary),
            can, ", ".join(f"{t} {p:.3f}" for t, p in mix.items()),
            f" ({', '.join(dead)}: no clip can carry it, so its weight went to translation)" if dead else "")

    def _keep(self, items: list, frames: np.ndarray) -> np.ndarray:
        """Rows to keep: all but (drop) those missing from a read modality, or (absent) all, the missing
        modalities' segments left to their learned absent rows; either way counted per modality."""
        cols = [k for k, m in enumerate(self.modalities) if m in self.stores]
        lacking = frames[:, cols] == ABSENT
        absent_mode = self.opts.missing_modality == "absent"
        fate = "given the learned absent segment" if absent_mode else "left out"
        for k, n in zip(cols, lacking.sum(axis=0).tolist()):
            if n:
                log.warning("%s/%s: %d of %d clips have no %s features and are %s", self.data_dir.name, self.split, n,
                            len(items), self.modalities[k], fate)
        if absent_mode:
            empty = np.flatnonzero(lacking.all(axis=1))
            if len(empty):
                v, c, _ = items[int(empty[0])]
                raise DataError(f"{self.data_dir}/{self.split}: video {v!r} clip {c!r} has features in none of "
                                f"{', '.join(self.read_modalities)}")
            return np.arange(len(items))
        keep = np.flatnonzero(~lacking.any(axis=1))
        if not len(keep):
            raise DataError(f"{self.data_dir}: split {self.split!r} has no clip with features in all of "
                            f"{', '.join(self.read_modalities)}")
        return keep

    def _refuse_implausible_lengths(self):
        """A clip of more than PLAUSIBLE_FRAMES frames after --max_frames is broken data (reading it would cost
        gigabytes): an error naming it, found from the index before anything is read."""
        for k, m in enumerate(self.modalities):
            n = self.frames[:, k].astype(np.int64)
            cap = self.limits[m]
            kept = np.minimum(n, cap) if cap > 0 and self.opts.frame_cap != "pool" else n    # pool reads them all
            over = np.flatnonzero(kept > PLAUSIBLE_FRAMES)
            if len(over):
                v, c, _ = self.items[int(over[0])]
                raise DataError(f"{self.stores[m].shard_file(v)}, video {v!r}, clip {c!r}: {int(n[over[0]]):,} {m} "
                                f"frames, beyond any plausible clip (over {PLAUSIBLE_FRAMES:,}; {len(over)} such clips "
                                f"in {self.split}); check the data (python data.py --data_dir), or cap what is read "
                                f"with --max_frames and --frame_cap stride or truncate")

    def _read_dims(self, expected_dims: dict[str, int] | None) -> dict[str, int]:
        """Dims read from the data (each modality's first clip that has it), then every read is checked against
        them; modalities that are never read take the checkpoint's."""
        dims = {}
        for k, m in enumerate(self.modalities):
            if m in self.stores:
                v, c, _ = self.items[int(np.flatnonzero(self.frames[:, k] != ABSENT)[0])]
                dims[m] = self.stores[m].dim(v, c)
        never_read = [m for m in self.modalities if m not in dims]
        if never_read and not expected_dims:
            raise DataError(f"modality {', '.join(never_read)} is marked absent but no checkpoint gives its feature dim")
        if expected_dims:
            unknown = [m for m in self.modalities if m not in expected_dims]
            if unknown:
                raise DataError(f"{self.data_dir}: modality {', '.join(unknown)} was not trained by the checkpoint "
                                f"(it knows {', '.join(expected_dims)})")
            bad = [f"{m}: data {dims[m]} vs checkpoint {expected_dims[m]}" for m in dims if expected_dims[m] != dims[m]]
            if bad:
                raise DataError(f"{self.stores[self.read_modalities[0]].metadata.parent.parent}: feature dims differ "
                                f"from the checkpoint ({'; '.join(bad)})")
            dims.update({m: expected_dims[m] for m in never_read})
        return {m: dims[m] for m in self.modalities}

    def absent_in(self, i: int) -> list[str]:
        """Modalities of the splice order clip i has no features for (absent segments)."""
        return [m for m, t in zip(self.modalities, self.frames[i].tolist()) if t == ABSENT]

    def segment_lengths(self, i: int) -> list[int]:
        """Positions between each segment's markers after --max_frames: frames, or 1 for an absent row."""
        return [1 if t == ABSENT else capped_len(t, self.limits[m]) for m, t in zip(self.modalities, self.frames[i].tolist())]

    def close(self):
        """Close this process's h5 handles (the next read reopens lazily). make_loader calls it before workers fork."""
        for s in self.stores.values():
            s.close()

    def __len__(self):
        return len(self.items)

    def feature_statistics(self, max_clips: int = 2000) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each read modality's per-dimension mean and standard deviation (float64 [D] each) over the frames of
        up to `max_clips` clips spread evenly over the split (all of a smaller one): what
        pretrain.py --standardize_features sets the projectors' FeatureScale from. The same clips on every rank."""
        picks = np.unique(np.linspace(0, len(self.items) - 1, min(len(self.items), max_clips)).round().astype(int))
        out = {}
        for m, store in self.stores.items():
            total, square, n = 0.0, 0.0, 0
            for i in picks.tolist():
                v, c, _ = self.items[i]
                if self.frames[i, self.modalities.index(m)] == ABSENT:
                    continue
                x = store.read(v, c, self.dims[m]).astype(np.float64)
                total, square, n = total + x.sum(0), square + (x * x).sum(0), n + len(x)
            if n == 0:
                raise DataError(f"{self.data_dir}/{self.split}: no {m} frames to standardise from")
            mean = total / n
            out[m] = mean, np.sqrt(np.maximum(square / n - mean * mean, 0.0))
        return out

    def frame_tokens(self, i: int) -> int:
        """Positions of the clip's modality segments: frames after --max_frames (one for an absent segment)
        plus two markers each."""
        return sum(n + 2 for n in self.segment_lengths(i))

    def length(self, i: int) -> int:
        """Approximate token count, for length-grouped batching (no tokenisation needed)."""
        return self.frame_tokens(i) + int(self._text_len[i]) // 4

    def context_for(self, video: str, position: int) -> list[str]:
        order = self.annotation.videos[video]
        ids = context_ids(position, self.opts.context_window, self.opts.prelude_window)
        return [t for t in (self.context_texts.get((video, order[i])) for i in ids) if t]

    def training_context(self, video: str, position: int, epoch: int, i: int) -> list[str]:
        """context_for, left out or corrupted during training as --context_dropout / --context_noise say; drawn
        from its own generator keyed on (seed, epoch, index), so other draws of the sample do not move."""
        context = self.context_for(video, position)
        o = self.opts
        if not (self.train and context and (o.context_dropout or o.context_noise)):
            return context
        if self._context_pool is None:
            self._context_pool = [c.translation for c in self.annotation.clips.values()]
        rng = np.random.default_rng([o.seed, epoch, i, 1])
        return imperfect_context(context, rng, o.context_dropout, o.context_noise, self._context_pool)

    def read_features(self, video: str, clip: str, absent: list[str] = (), frames=None) -> list[np.ndarray]:
        """One array per modality of the splice order; an absent one is empty ([0, D]). `frames`: the clip's row
        of self.frames, to check each read against the index that planned the batches."""
        return [np.zeros((0, self.dims[m]), np.float32) if m in absent else
                self.stores[m].read(video, clip, self.dims[m], self.limits[m], self.opts.frame_cap,
                                    None if frames is None else int(frames[k]))
                for k, m in enumerate(self.modalities)]

    def dropped_modalities(self, i: int, epoch: int, absent: list[str]) -> list[str]:
        """--modality_dropout: present modalities this training sample replaces by their absent rows, never all.
        Drawn from its own generator keyed on (seed, epoch, index), so resume is exact and the other draws
        of the sample are the same with or without dropout."""
        present = [m for m in self.modalities if m not in absent]
        p = self.opts.modality_dropout
        if not self.train or p <= 0 or len(present) < 2:
            return []
        rng = np.random.default_rng([self.opts.seed, epoch, i, 2])     # 1: --context_noise's stream
        drop = rng.random(len(present)) < p
        if drop.all():
            drop[int(rng.integers(len(present)))] = False
        return [m for m, d in zip(present, drop) if d]

    # -- the --max_seq_len guard
    def _apply_length_guard(self) -> int:
        """Clips whose translation sample (longest target, full context) exceeds --max_seq_len: skipped
        (long_samples=skip) or counted and capped when loaded. Exact token counts only for clips whose cheap
        upper bound (a byte-level token holds at least one byte) is over the limit."""
        limit = self.opts.max_seq_len
        if limit <= 0:
            return 0
        base = len(self.builder.build([0] * len(self.modalities), "", None)[0]) + 16   # template + answer's own tokens
        over = []
        for i, (v, c, pos) in enumerate(self.items):
            text = self.annotation.clips[(v, c)]
            prompt = translation_prompt(self.context_for(v, pos))
            answers = [text.translation] + (text.paraphrases if self.train and self.opts.use_paraphrases else [])
            answer = max(answers, key=lambda t: len(t.encode()))
            if self.frame_tokens(i) + base + len(prompt.encode()) + len(answer.encode()) <= limit:
                continue
            if len(self.builder.build(self.segment_lengths(i), prompt, answer)[0]) > limit:
                over.append(i)
        if over and self.opts.long_samples == "skip":
            keep = np.setdiff1d(np.arange(len(self.items)), over)
            self.items = [self.items[j] for j in keep.tolist()]
            self.frames = np.ascontiguousarray(self.frames[keep])
            log.warning("%s/%s: %d clips are longer than --max_seq_len %d and are skipped", self.data_dir.name,
                        self.split, len(over), limit)
            if not self.items:
                raise DataError(f"{self.data_dir}: every clip of split {self.split!r} is longer than --max_seq_len {limit}")
        elif over:
            log.warning("%s/%s: %d clips are longer than --max_seq_len %d; their frames are capped to fit",
                        self.data_dir.name, self.split, len(over), limit)
        return len(over)

    def _fit_frames(self, feats: list[np.ndarray], absent: list[str], length: int, where: str) -> list[np.ndarray]:
        """Fewer frames (the --frame_cap rule, each present modality in proportion) so that a sample of
        `length` tokens fits --max_seq_len; text is never cut. An error if the text alone does not fit."""
        limit = self.opts.max_seq_len
        present = [k for k, m in enumerate(self.modalities) if m not in absent]
        total = sum(len(feats[k]) for k in present)
        budget = total - (length - limit)
        if budget < len(present):
            raise DataError(f"{where}: its text takes {length - total} tokens; --max_seq_len {limit} leaves no room "
                            f"for its frames")
        out = list(feats)
        for k in present:
            out[k] = cap_frames(feats[k], max(1, len(feats[k]) * budget // total), self.opts.frame_cap)
        while sum(len(out[k]) for k in present) > budget:      # the max(1, .) floors can overshoot: trim the longest
            k = max(present, key=lambda j: len(out[j]))
            out[k] = cap_frames(out[k], len(out[k]) - 1, self.opts.frame_cap)
        return out

    def __getitem__(self, key):
        # The batch plan hands out (index, epoch); plain integer indexing means epoch 0.
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        video, clip, pos = self.items[i]
        text = self.annotation.clips[(video, clip)]
        seed = [self.opts.seed, epoch, i] if self.train else [self.opts.seed, i]
        rng = np.random.default_rng(seed)
        absent = self.absent_in(i)
        absent += self.dropped_modalities(i, epoch, absent)
        feats = self.read_features(video, clip, absent, self.frames[i])
        task = self.fixed_task or self._tasks[int(rng.choice(len(self._tasks), p=self._task_p))]
        sample = None
        if task != "translation":
            sample = make_task(task, text.translation, text.keywords, self.vocabulary, rng, self.opts.max_num_words)
        if sample is None:              # translation, or a clip that cannot carry the drawn task
            task = "translation"
            target = text.translation
            if self.train and self.opts.use_paraphrases and text.paraphrases:
                choices = [text.translation] + text.paraphrases
                target = choices[int(rng.integers(len(choices)))]
            prompt, answer = translation_prompt(self.training_context(video, pos, epoch, i)), target
        else:
            prompt, answer = sample.prompt, sample.answer
            if sample.reverse_time:
                feats = [np.ascontiguousarray(f[::-1]) for f in feats]
        answer_in = None if self.generation else answer
        ids, labels, seg = self.builder.build(segment_sizes(feats, self.modalities, absent), prompt, answer_in)
        if 0 < self.opts.max_seq_len < len(ids):
            feats = self._fit_frames(feats, absent, len(ids), f"{self.data_dir}/{self.split}: video {video!r} clip {clip!r}")
            ids, labels, seg = self.builder.build(segment_sizes(feats, self.modalities, absent), prompt, answer_in)
        return {"input_ids": ids, "labels": labels, "segments": seg, "features": feats,
                "modalities": self.modalities, "absent": absent, "video": video, "clip": clip, "task": task,
                "prompt": prompt, "answer": answer}


class Collator:
    """Pads a list of samples to the longest in the batch (not to a fixed length).

    Frames of modality m from every sample are concatenated into `features[m]` [N_m, D_m];
    `frame_index[m]` [N_m] gives each frame's flat position in the [B, L] sequence, so the model
    splices all frames of the batch with one indexed write per modality. `absent_index[m]` holds the one
    position of each absent segment of modality m (its learned absent row goes there)."""

    def __init__(self, pad_id: int, padding_side: str = "right"):
        self.pad_id, self.padding_side = pad_id, padding_side

    def __call__(self, items: list[dict]) -> dict:
        B, L = len(items), max(len(it["input_ids"]) for it in items)
        ids = np.full((B, L), self.pad_id, dtype=np.int64)
        labels = np.full((B, L), -100, dtype=np.int64)
        mask = np.zeros((B, L), dtype=np.int64)
        feats: dict[str, list] = {}
        index: dict[str, list] = {}
        absent: dict[str, list] = {}
        for b, it in enumerate(items):
            n = len(it["input_ids"])
            off = 0 if self.padding_side == "right" else L - n
            ids[b, off:off + n] = it["input_ids"]
            labels[b, off:off + n] = it["labels"]
            mask[b, off:off + n] = 1
            for k, m in enumerate(it["modalities"]):
                pos = np.nonzero(it["segments"] == k)[0] + off + b * L
                if m in it.get("absent", ()):
                    absent.setdefault(m, []).append(pos)
                    continue
                feats.setdefault(m, []).append(it["features"][k])
                index.setdefault(m, []).append(pos)
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "attention_mask": torch.from_numpy(mask),
                "features": {m: torch.from_numpy(np.concatenate(v)) for m, v in feats.items()},
                "frame_index": {m: torch.from_numpy(np.concatenate(v)) for m, v in index.items()},
                "absent_index": {m: torch.from_numpy(np.concatenate(v)) for m, v in absent.items()},
                "meta": [{k: it[k] for k in ("video", "clip", "task", "prompt", "answer")} for it in items]}


TOKEN_BUDGET_WINDOW = 1024       # samples sorted together under --max_tokens_per_batch (what bench/benchmark.py measured)
_budget_warned: set = set()


def plan_epoch(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, group_by_length: bool,
               max_tokens: int | None = None, overhead: int = 0, packed: bool = False) -> list[list[int]]:
    """The batches of one training epoch, identical on every rank.

    Shuffle, then (optionally) sort within windows of 64 batches by length so that a batch holds
    samples of similar length and padding stays small, then shuffle the batch order.

    `max_tokens` (> 0): batches are cut by a padded-token budget instead of a fixed size: windows of
    TOKEN_BUDGET_WINDOW samples, sorted by length when grouping, are cut into consecutive runs whose
    padded size (run length x (longest `lengths` value in it + `overhead`)) stays within the budget, so
    short samples come in large batches and long ones in small batches at the same memory high-water
    mark; a sample longer than the budget on its own is a batch of one (counted in a one-time warning).
    `overhead`: tokens every sample has on top of its `lengths` value (SignDataset.length leaves out the
    prompt template). `packed`: a batch costs the sum of its lengths (a packed row has no padding) rather than
    rows x longest. `batch_size` is then unused. The number of batches may differ between epochs.
    Deterministic in (seed, epoch)."""
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([seed, epoch, 7])
    perm = rng.permutation(len(lengths))
    if max_tokens:
        return _plan_token_budget(lengths + overhead, perm, rng, int(max_tokens), group_by_length, packed)
    if group_by_length:
        win = batch_size * 64
        perm = np.concatenate([w[np.argsort(-lengths[w], kind="stable")] for w in np.array_split(perm, max(1, -(-len(perm) // win)))])
    batches = [perm[i:i + batch_size].tolist() for i in range(0, len(perm), batch_size)]
    order = rng.permutation(len(batches))
    return [batches[j] for j in order]


def _plan_token_budget(lengths: np.ndarray, perm: np.ndarray, rng: np.random.Generator, max_tokens: int,
                       group_by_length: bool, packed: bool) -> list[list[int]]:
    over = int((lengths > max_tokens).sum())
    key = (len(lengths), max_tokens, over)
    if over and key not in _budget_warned:
        _budget_warned.add(key)
        log.warning("%d of %d training samples are longer than --max_tokens_per_batch %d (longest %d); "
                    "each is a batch of its own", over, len(lengths), max_tokens, int(lengths.max()))
    batches = []
    for w in np.array_split(perm, max(1, -(-len(perm) // TOKEN_BUDGET_WINDOW))):
        if group_by_length:
            w = w[np.argsort(-lengths[w], kind="stable")]
        cur, cur_max, cur_sum = [], 0, 0
        for i in w.tolist():
            n = int(lengths[i])
            cost = cur_sum + n if packed else (len(cur) + 1) * max(cur_max, n)
            if cur and cost > max_tokens:
                batches.append(cur)
                cur, cur_max, cur_sum = [], 0, 0
            cur.append(i)
            cur_max, cur_sum = max(cur_max, n), cur_sum + n
        if cur:
            batches.append(cur)
    order = rng.permutation(len(batches))
    return [batches[j] for j in order]


def rank_share(batches: list, rank: int, world: int, per_step: int) -> list:
    """This rank's micro-batches of an epoch: every world-th, after dropping the tail that would not fill
    a whole optimizer step on every rank. Ranks get disjoint samples; together they cover the epoch."""
    usable = len(batches) // per_step * per_step
    return batches[:usable][rank::world]


def eval_batches(dataset: SignDataset, batch_size: int) -> list[list[int]]:
    """Dev batches in length order (fixed, less padding)."""
    order = np.argsort([-dataset.length(i) for i in range(len(dataset))], kind="stable")
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def make_loader(dataset, batches: list[list], collate, num_workers: int, pin_memory: bool):
    """A DataLoader over a precomputed batch list. Batches are lists of `(index, epoch)` or indices.
    Workers get their own torch generator so creating a loader never consumes the global RNG.
    With workers, the parent's h5 handles are closed first: h5py handles must not cross a fork (the workers
    would share file offsets and HDF5 state with the parent); each worker opens its own on first read."""
    if num_workers > 0 and hasattr(dataset, "close"):
        dataset.close()
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
        pin_memory=pin_memory, prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(0))


def add_path_args(p):
    """--annotation_file and --features (signllava/data_paths.py), for every command that reads a dataset."""
    p.add_argument("--annotation_file", metavar="PATH|SPLIT=PATH,...",
                   help="annotation file(s) instead of DATA_DIR/annotation.<split>.json: one PATH for every split, "
                        "PATH with {split} in it (h2s.annotations.{split}.json), or train=A,dev=B; relative paths are "
                        "under --data_dir")
    p.add_argument("--features", metavar="NAME=PATH,...",
                   help="metadata file of a modality instead of DATA_DIR/NAME/metadata_NAME.<split>.json, with {split} "
                        "in PATH (sign2vec=sign2vec/finetune/run/metadata_sign2vec.{split}.json) or NAME.SPLIT=PATH "
                        "for one split; its shards lie beside it; relative paths are under --data_dir; modalities "
                        "not named are found in DATA_DIR's folders as before")


def main(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--make_demo", metavar="DIR", help="write the built-in demo language into DIR")
    p.add_argument("--seed", type=int, default=0, help="demo seed")
    p.add_argument("--demo_context", action="store_true",
                   help="with --make_demo: sentences refer back to the previous one (a pointing sign whose English "
                        "is the previous subject), so translation needs context")
    p.add_argument("--data_dir", help="check every annotation, metadata and h5 file of this dataset")
    p.add_argument("--split", choices=["train", "dev", "test"], action="append",
                   help="split(s) to check (default: all present)")
    p.add_argument("--modalities", help="comma-separated subset of modality folders")
    add_path_args(p)
    args = p.parse_args(argv)
    if args.make_demo:
        from signllava.demo import write_demo
        from signllava.errors import run_command
        return run_command(lambda: print(f"demo language written to "
                                         f"{write_demo(args.make_demo, seed=args.seed, context=args.demo_context)}") or 0)
    if not args.data_dir:
        p.error("give --data_dir D (check a dataset) or --make_demo DIR")
    from signllava.datacheck import check_dataset
    try:
        paths = DataPaths.from_specs(args.data_dir, args.annotation_file, args.features)
    except ValueError as e:
        p.error(str(e))
    return check_dataset(paths, args.split, args.modalities.split(",") if args.modalities else None)


if __name__ == "__main__":
    sys.exit(main())
