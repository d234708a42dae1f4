"""Translate a split with a trained checkpoint (batched beam search from a shared prefill) and score it.

    python generate.py --checkpoint C --data_dir D --split dev --output OUT.json --metrics_out METRICS.json
                       [--report OUT.html] [--num_beams 5] [--max_new_tokens 192] [--min_new_tokens 0]
                       [--batch_size 16] [--context none|gold|predicted|FILE] [--context_window N]
                       [--prelude_window P] [--task translation|one_word_present|multi_word_present|is_reversed]
                       [--limit N] [--no_repeat_ngram_size N] [--bootstrap 1000] [--bleurt PATH|ID]
                       [--modalities pose]  (a subset: the others get their learned absent rows)
    python generate.py --score_only OUT.json [--metrics_out METRICS.json] [--report OUT.html]
    deepspeed --num_gpus N generate.py ...        # (or torchrun) the clips split across ranks, one output

C is a stage-1 or stage-2 output dir (its latest complete checkpoint) or a checkpoint dir. Everything that
must match training -- base model, tokenizer, modalities, dims, projector types, frame cap, default context
windows -- comes from the checkpoint's config.json; a stage-2 checkpoint brings its LoRA adapter.

Context (translation task); the default is `predicted` for a checkpoint trained with a context window and
`none` otherwise -- what a model meets at test time:
    none       no preceding sentences
    gold       the reference translations of the preceding clips (only when asked: it flatters the score)
    predicted  the model's own outputs for the preceding clips of the same video. Clips are generated in
               rounds: round k holds the k-th clip of every video, so batches run across videos.
    FILE       the "hypothesis" fields of an earlier output JSON of this script
Windows default to the checkpoint's (what it was trained with); clips with no features never give context.

OUT.json has the annotation layout, {video: {"clip_order": [...], clip: {"translation", "paraphrases",
"keywords", "hypothesis"}}} holding the generated clips; translation adds each clip's "sentence_bleu" and
"sentence_chrf" (and its "context" sentences when there were any), the yes/no tasks "reference" and "prompt".
METRICS.json: for translation BLEU-1..4, chrF, ROUGE-L, multi-reference BLEU / chrF (translation + paraphrases),
each with its sacreBLEU signature or package version, a 95 % interval on BLEU and chrF (sacreBLEU's bootstrap,
--bootstrap N), BLEU / chrF per video and per reference length, BLEURT with --bleurt; n, the context mode and
windows; accuracy / precision / recall / F1 of 'yes' for the yes/no tasks. --report: one self-contained HTML
page (no server, nothing fetched) with the scores and every clip, worst first, filterable by video and text.
`python -m signllava.compare A.json B.json ...` compares outputs (differences, p-values, seeds).

Under a launcher each rank translates whole videos (so predicted context stays on one rank); rank 0 gathers
and writes one output in clip order.

Inference from Python:

    from generate import Translator
    tr = Translator.from_checkpoint("runs/stage2")
    tr.translate({"mae": mae_array, "pose": pose_array}, context=["Earlier sentence."], num_beams=5)
    tr.translate({"pose": pose_array}, context="The previous sentence.")     # a string is one sentence
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from model import SignConfig, compute_dtype
from signllava.atomic import outputs_problems, write_atomic
from signllava.checkpoint import ADAPTER_DIR, PROJECTORS_NAME
from signllava.cli import make_parser
from signllava.config import add_config_arg, parse_args
from signllava.data_paths import DataPaths, data_problems
from signllava.errors import CheckpointError, DataError, RunError, brief, range_problems, run_command
from signllava.layout import load_annotation
from signllava.output_json import check_output_json, reference_field
from signllava.prompts import TASKS, PromptBuilder, context_ids, special_ids, translation_prompt
from signllava.scoring import (N_BOOTSTRAP, breakdowns, check_metric_packages, compute_metrics,  # noqa: F401 (API)
                               format_table, sentence_scores, yes_no_metrics)

log = logging.getLogger("signllava")
# Fits real sentences: How2Sign's longest references run past 60 words (~80-100 Llama-3 tokens). Beam search
# stops at the end-of-turn token, so a roomy limit only costs on runaway outputs.
MAX_NEW_TOKENS = 192


# ------------------------------------------------------------------------------------------- model
def load_config(path) -> tuple[Path, SignConfig]:
    """(checkpoint dir, its config) for a checkpoint dir or an output dir."""
    from signllava.checkpoint import resolve_checkpoint
    ckpt = resolve_checkpoint(path)
    return ckpt, SignConfig.load(ckpt)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DECODE_MODES = ("graph", "static", "eager")


def default_decode(device: torch.device) -> str:
    """How beam-search steps run (signllava/decode_graph.py): "graph" (a static cache, each step replayed from
    a CUDA graph) on a GPU; "eager" (the growing cache, step by step) elsewhere; "static" is the graph's
    layout without the graph, for checking it on any device."""
    return "graph" if device.type == "cuda" else "eager"


def _as_list(items):
    """DataLoader collate: keep the samples; Translator.generate_items pads them itself."""
    return items


def _cache_kwarg(decoder) -> str:
    """The KV-cache argument's name: transformers 5.2x calls it `cache`, earlier 5.x `past_key_values`;
    generate() reads a given cache under the name forward() takes."""
    import inspect
    from transformers.generation.utils import GenerationMixin
    # Without _prefill, generate() would run the whole of inputs_embeds again on top of the cache: wrong output.
    if not hasattr(GenerationMixin, "_prefill"):
        raise RuntimeError("this transformers cannot continue generate() from a filled cache with inputs_embeds "
                           "(5.17 and 5.24 can)")
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


class Translator:
    """A loaded checkpoint, ready to generate. Build it with `from_checkpoint`.

    Every generation -- `translate()` for one clip, `generate_items()` for a batch of dataset samples --
    goes through `generate_ids`: left-padded batch -> SignLLM.embed -> the prompt prefilled once per clip
    into a KV cache -> llm.generate (beam search) continuing from that cache."""

    def __init__(self, model, tokenizer, cfg: SignConfig, device: torch.device, checkpoint: Path | None = None):
        from data import Collator
        self.model, self.tokenizer, self.cfg, self.device, self.checkpoint = model, tokenizer, cfg, device, checkpoint
        self.ids = special_ids(tokenizer)
        self.builder = PromptBuilder(tokenizer, self.ids["markers"], self.ids["pad"], system_prompt=cfg.system_prompt)
        self.collate = Collator(self.ids["pad"], padding_side="left")
        # The context policy of training; may be changed for an experiment.
        self.context_window, self.prelude_window = cfg.context_window, cfg.prelude_window
        self.decode_steps = default_decode(device)
        # Under ZeRO-3 every rank must run every forward: generate() keeps a finished rank stepping until all are.
        self.synced_ranks = False
        # Off as in the original; N > 0: no n-gram of N tokens twice in a hypothesis (an under-trained model's
        # loops, which run to max_new_tokens and dominate the corpus BLEU, are cut short).
        self.no_repeat_ngram_size = 0

    @classmethod
    def from_checkpoint(cls, path, device: torch.device | str | None = None) -> "Translator":
        from model import load_tokenizer
        ckpt, cfg = load_config(path)
        tokenizer, _ = load_tokenizer(cfg.tokenizer, cfg.chat_template)
        return cls.load(ckpt, cfg, tokenizer, device)

    @classmethod
    def load(cls, ckpt: Path, cfg: SignConfig, tokenizer, device: torch.device | str | None = None) -> "Translator":
        from model import assemble, read_projector_file
        device = torch.device(device) if device is not None else default_device()
        adapter = None
        if cfg.lora:        # stage 2 with its adapter; an export.py directory has it merged (lora None)
            if not (ckpt / ADAPTER_DIR).is_dir():
                raise CheckpointError(f"{ckpt}: a stage-2 checkpoint without its {ADAPTER_DIR}/ directory")
            adapter = str(ckpt / ADAPTER_DIR)
        model = assemble(cfg, tokenizer, device, compute_dtype(device), adapter=adapter)
        model.load_projector_state(read_projector_file(ckpt / PROJECTORS_NAME), str(ckpt / PROJECTORS_NAME))
        model.eval()
        return cls(model, tokenizer, cfg, device, ckpt)

    def embed_batch(self, items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded batch of samples -> (inputs_embeds with frames spliced in, attention_mask), on the device."""
        batch = self.collate(items)
        dev = self.device
        emb = self.model.embed(batch["input_ids"].to(dev), {m: t.to(dev) for m, t in batch["features"].items()},
                               {m: t.to(dev) for m, t in batch["frame_index"].items()},
                               {m: t.to(dev) for m, t in batch["absent_index"].items()})
        return emb, batch["attention_mask"].to(dev)

    # -- the one generation path
    @torch.inference_mode()
    def generate_ids(self, items: list[dict], num_beams: int = 5, max_new_tokens: int = MAX_NEW_TOKENS,
                     min_new_tokens: int = 0) -> list[list[int]]:
        """New token ids (up to, not including, the end-of-turn token) for each sample, in order.
        A sample is a dict like SignDataset's: input_ids, labels, segments, features (one per modality), modalities.

        Shared prefill: HF beam search repeats every prompt num_beams times before its prefill, and our prompts
        are mostly video frames (hundreds to thousands of positions), so the prefill would dominate. Instead the
        prompt minus its last position runs through the decoder once per clip into a KV cache (no logits), the
        cache is repeated per beam into buffers that new tokens fill in place (beam_cache.PromptSharedLayer),
        and generate() continues from it: it feeds only the uncached last prompt position, whose logits give the
        first new token. The same path for num_beams == 1."""
        import contextlib

        from transformers import DynamicCache

        from signllava.beam_cache import expand_for_beams
        from signllava.decode_graph import StaticDecode
        if not items:
            return []
        emb, mask = self.embed_batch(items)
        decoder = self.model.decoder()       # the base model's, LoRA layers (if any) inside it
        key = _cache_kwarg(decoder)
        # Left padding: positions are generate()'s own rule (mask cumsum - 1, pads at 0), so every row starts at
        # position 0 whatever its padding, and the cached prefix agrees with what generate() gives the last position.
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        cache = DynamicCache(config=decoder.config)
        decoder(inputs_embeds=emb[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1], use_cache=True,
                **{key: cache})
        # generate() expands embeds and mask per beam, but not a given cache: the cache serves num_beams rows per
        # clip itself, its prompt part written once and never copied again (beam_cache.py); "graph"/"static"
        # give it its final size and run the steps on fixed buffers (decode_graph.py).
        if self.decode_steps == "eager":
            expand_for_beams(cache, num_beams, max_new_tokens + 1)
            steps = contextlib.nullcontext()
        else:
            steps = StaticDecode(self.model.llm, cache, num_beams, max_new_tokens + 1, graphs=self.decode_steps == "graph")
        # The full embeds and mask go in: generate() slices the embeds to what the cache lacks (the last position)
        # and takes the mask over the whole prompt; only new tokens come back.
        with steps:
            out = self.model.llm.generate(inputs_embeds=emb, attention_mask=mask, num_beams=num_beams, do_sample=False,
                                          max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens or None,
                                          no_repeat_ngram_size=self.no_repeat_ngram_size or None,
                                          synced_gpus=self.synced_ranks, eos_token_id=self.ids["eot"],
                                          pad_token_id=self.ids["pad"], use_cache=True, **{key: cache})
        eot = self.ids["eot"]
        return [row[:row.index(eot)] if eot in row else row for row in out.tolist()]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def generate_items(self, items: list[dict], num_beams: int = 5, max_new_tokens: int = MAX_NEW_TOKENS,
                       min_new_tokens: int = 0) -> list[str]:
        return [self.decode(r) for r in self.generate_ids(items, num_beams, max_new_tokens, min_new_tokens)]

    # -- the API
    def make_item(self, features: dict[str, np.ndarray], prompt: str) -> dict:
        """A sample from raw features (any subset of the checkpoint's modalities; the others get their learned
        absent rows) and a prompt text. Frames are capped as in training."""
        from data import cap_frames, frame_limits, segment_sizes
        if not features:
            raise ValueError(f"no features given (the checkpoint knows {', '.join(self.cfg.modalities)})")
        unknown = [m for m in features if m not in self.cfg.modalities]
        if unknown:
            raise ValueError(f"modality {', '.join(map(repr, unknown))} was not trained by this checkpoint "
                             f"(it knows {', '.join(self.cfg.modalities)})")
        if self.cfg.modality_embeddings:
            mods = list(self.cfg.modalities)
        else:     # a checkpoint of before absent rows: the given segments in training's order, as it was trained
            mods = [m for m in self.cfg.modalities if m in features]
        absent = [m for m in mods if m not in features]
        limits = frame_limits(self.cfg.max_frames, list(self.cfg.modalities))
        feats = []
        for m in mods:
            if m in absent:
                feats.append(np.zeros((0, self.cfg.dims[m]), np.float32))
                continue
            a = features[m]
            if isinstance(a, torch.Tensor):     # any dtype or device, grad or not (numpy takes no bf16, no grad)
                a = a.detach().to("cpu", torch.float32).numpy() if a.is_floating_point() else a.cpu().numpy()
            a = np.asarray(a)
            if a.ndim != 2 or a.shape[1] != self.cfg.dims[m]:
                raise ValueError(f"modality {m!r}: features of shape {tuple(a.shape)}, the checkpoint expects "
                                 f"[T, {self.cfg.dims[m]}]")
            if a.shape[0] == 0:
                raise ValueError(f"modality {m!r}: zero frames")
            if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
                raise ValueError(f"modality {m!r}: features must be finite floating-point values")
            feats.append(cap_frames(a, limits[m], self.cfg.frame_cap))
        ids, labels, seg = self.builder.build(segment_sizes(feats, mods, absent), prompt, None)
        return {"input_ids": ids, "labels": labels, "segments": seg, "features": feats, "modalities": mods,
                "absent": absent, "video": None, "clip": None, "task": "translation", "prompt": prompt, "answer": None}

    def context_prompt(self, context: str | list[str] | None) -> str:
        """The translation prompt with the sentences `pick_context` keeps."""
        return translation_prompt(self.pick_context(context))

    def pick_context(self, context: str | list[str] | None) -> list[str]:
        """Training's policy: `context` is the video's preceding sentences in time order (a string is one
        sentence, as the original's prepare_translation_prompt took it); the checkpoint's windows pick the first
        `prelude_window` and the last `context_window` of them. A checkpoint trained without a window gets no
        context, and a warning says so rather than dropping it silently."""
        if context is None:
            context = []
        elif isinstance(context, str):
            context = [context]
        elif not all(isinstance(c, str) for c in context):
            raise TypeError(f"context: a sentence (str) or a list of sentences, got {context!r:.80}")
        if any(c.strip() for c in context) and self.context_window == 0 and self.prelude_window == 0:
            warnings.warn(f"context ignored: {self.checkpoint or 'this checkpoint'} was trained without a context "
                          "window (set Translator.context_window / prelude_window to give it context anyway)",
                          stacklevel=4)
        pick = context_ids(len(context), self.context_window, self.prelude_window)
        return [context[i] for i in pick if context[i].strip()]

    def translate(self, features: dict[str, np.ndarray], context: str | list[str] | None = None,
                  num_beams: int = 5, max_new_tokens: int = MAX_NEW_TOKENS, min_new_tokens: int = 0) -> str:
        item = self.make_item(features, self.context_prompt(context))
        return self.generate_items([item], num_beams, max_new_tokens, min_new_tokens)[0]


# ------------------------------------------------------------------------------------------- the split
def context_policy(cfg: SignConfig, mode: str | None, context_window: int | None = None,
                   prelude_window: int | None = None, task: str = "translation") -> tuple[str, int, int]:
    """-> (context mode, window, prelude window). Honest by default: a checkpoint trained with a context window
    gets its own predicted context (gold context does not exist at test time); one trained without gets none,
    and so do the yes/no tasks, whose prompts carry no context."""
    trained = (cfg.context_window > 0 or cfg.prelude_window > 0) and task == "translation"
    mode = mode or ("predicted" if trained else "none")
    if mode == "none":
        return mode, 0, 0
    cw = cfg.context_window if context_window is None else context_window
    pw = cfg.prelude_window if prelude_window is None else prelude_window
    return mode, cw, pw


def generation_dataset(data, split: str, builder: PromptBuilder, cfg: SignConfig, mode: str, cw: int, pw: int,
                       task: str = "translation", seed: int = 42, absent: tuple[str, ...] = ()):
    """The split as generation reads it (prompt ids only, one task, the checkpoint's modalities and frame cap):
    the same clips in the same order for generate.py and for training's evaluation. `data`: the data folder or
    a DataPaths."""
    from data import DataOptions, SignDataset
    opts = DataOptions(modalities=list(cfg.modalities), max_frames=cfg.max_frames, frame_cap=cfg.frame_cap,
                       absent_modalities=absent, missing_modality="absent" if cfg.modality_embeddings else "drop",
                       max_seq_len=cfg.max_seq_len, context_window=cw, prelude_window=pw, task_weights={task: 1.0},
                       seed=seed)
    ds = SignDataset(data, split, builder, opts, train=False, expected_dims=cfg.dims)
    ds.generation, ds.fixed_task = True, task
    if mode == "predicted":
        ds.context_texts = {}
    elif mode not in ("none", "gold"):
        ds.context_texts = read_hypotheses(Path(mode))
    return ds


def prompt_length(ds, i: int) -> int:
    """Approximate prompt tokens of clip i: its segments and its context sentences (about 4 characters a token)."""
    v, _, pos = ds.items[i]
    return ds.frame_tokens(i) + sum(len(t) for t in ds.context_for(v, pos)) // 4


def clips_by_video(ds, indices: list[int]) -> dict[str, list[int]]:
    """video -> its clips among `indices`, in the order given."""
    by_video: dict[str, list[int]] = {}
    for i in indices:
        by_video.setdefault(ds.items[i][0], []).append(i)
    return by_video


def plan_rounds(ds, indices: list[int], predicted: bool) -> list[list[int]]:
    """One set of everything, or (predicted context) round k = the k-th generated clip of every video."""
    if not predicted or not indices:
        return [indices] if indices else []
    by_video = clips_by_video(ds, indices)
    for lst in by_video.values():
        lst.sort(key=lambda i: ds.items[i][2])
    n = max(len(lst) for lst in by_video.values())
    return [[lst[k] for lst in by_video.values() if len(lst) > k] for k in range(n)]


def count_calls(ds, indices: list[int], predicted: bool, batch_size: int) -> int:
    """How many batches (generate calls) generate_split makes for these clips."""
    return sum(-(-len(r) // batch_size) for r in plan_rounds(ds, indices, predicted))


def share_by_video(ds, indices: list[int], rank: int, world: int) -> list[int]:
    """This rank's clips: whole videos (predicted context stays on one rank), dealt largest first to the rank
    with the fewest clips so far. Every rank computes the same deal."""
    if world == 1:
        return list(indices)
    load, mine = [0] * world, []
    for lst in sorted(clips_by_video(ds, indices).values(), key=len, reverse=True):
        r = load.index(min(load))
        load[r] += len(lst)
        if r == rank:
            mine += lst
    return sorted(mine)


def gather_results(results: dict, world: int) -> dict:
    """Every rank's results, merged (on every rank)."""
    if world == 1:
        return results
    parts: list = [None] * world
    torch.distributed.all_gather_object(parts, results)
    return {k: v for part in parts for k, v in part.items()}


def generate_split(tr: Translator, ds, indices: list[int], *, task: str, predicted: bool, batch_size: int,
                   num_beams: int, max_new_tokens: int, min_new_tokens: int = 0, num_workers: int = 0,
                   calls: int | None = None, progress: bool = True) -> dict[tuple[str, str], dict]:
    """(video, clip) -> {"hypothesis", "reference", "prompt", "context"} for every clip that carries `task`.
    `calls` (ZeRO-3 with several ranks): make exactly that many generate calls, the ones beyond this rank's
    own batches on a repeat of clip 0 whose output is dropped, so every rank runs every forward."""
    from tqdm import tqdm
    from data import make_loader
    results: dict[tuple[str, str], dict] = {}
    position = {(v, c): pos for v, c, pos in ds.items}
    skipped = done = 0
    dummy = [ds[0]] if calls is not None else []
    bar = tqdm(total=len(indices), desc="generate", dynamic_ncols=True, file=sys.stderr, disable=not progress)
    for rnd in plan_rounds(ds, indices, predicted):
        # Lengths are read now: in predicted mode the context of this round only exists now.
        order = sorted(rnd, key=lambda i: -prompt_length(ds, i))
        batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
        for items in make_loader(ds, batches, _as_list, num_workers, pin_memory=False):
            keep = [it for it in items if it["task"] == task]
            skipped += len(items) - len(keep)
            hyps = tr.generate_items(keep or dummy, num_beams, max_new_tokens, min_new_tokens)
            done += 1
            for it, hyp in zip(keep, hyps):
                key = (it["video"], it["clip"])
                results[key] = {"hypothesis": hyp, "reference": it["answer"], "prompt": it["prompt"],
                                "context": ds.context_for(key[0], position[key])}
                if predicted:
                    ds.context_texts[key] = hyp
            bar.update(len(items))
    for _ in range(done, calls or 0):
        tr.generate_items(dummy, num_beams, max_new_tokens, min_new_tokens)
    bar.close()
    if skipped:
        log.warning("%d clips cannot carry the task %s (no candidate words) and were skipped", skipped, task)
    return results


def read_hypotheses(path: Path) -> dict[tuple[str, str], str]:
    ann = load_annotation(path)
    hyps = {k: c.hypothesis for k, c in ann.clips.items() if c.hypothesis is not None}
    if not hyps:
        raise DataError(f"{path}: no 'hypothesis' fields (give an output JSON of generate.py as --context)")
    return hyps


def build_output(ds, results: dict, task: str) -> dict:
    out = {}
    for video, order in ds.annotation.videos.items():
        done = [c for c in order if (video, c) in results]
        if not done:
            continue
        vd: dict = {"clip_order": done}
        for c in done:
            text, r = ds.annotation.clips[(video, c)], results[(video, c)]
            entry = {"translation": text.translation, "paraphrases": text.paraphrases, "keywords": text.keywords,
                     "hypothesis": r["hypothesis"]}
            if task != "translation":
                entry["reference"], entry["prompt"] = r["reference"], r["prompt"]
            elif r["context"]:
                entry["context"] = r["context"]
            vd[c] = entry
        out[video] = vd
    return out


def score_output(output: dict, task: str, n_bootstrap: int = 0, bleurt: str | None = None,
                 bleurt_batch_size: int = 16) -> dict:
    """Corpus metrics of an output JSON (signllava/scoring.py's suite for translation: BLEU-1..4, chrF,
    ROUGE-L, multi-reference BLEU / chrF with the paraphrases, a 95 % interval with n_bootstrap > 1, per-video
    and per-length breakdowns; BLEURT with a checkpoint); for translation, each clip's sentence BLEU and chrF
    written into it."""
    videos = [v for v, vd in output.items() for _ in vd["clip_order"]]
    entries = [vd[c] for vd in output.values() for c in vd["clip_order"]]
    hyps = [e["hypothesis"] for e in entries]
    refs = [e[reference_field(e)] for e in entries]
    if task != "translation":
        return compute_metrics(hyps, refs, task)
    for e, h, r in zip(entries, hyps, refs):
        e.update(sentence_scores(h, r))
    metrics = compute_metrics(hyps, refs, task, paraphrases=[e.get("paraphrases") or [] for e in entries],
                              n_bootstrap=n_bootstrap)
    metrics.update(breakdowns(videos, hyps, refs))
    if bleurt:
        from signllava.bleurt import BleurtScorer
        scorer = BleurtScorer.load(bleurt)
        per_clip = scorer.score(hyps, refs, batch_size=bleurt_batch_size)
        for e, b in zip(entries, per_clip):
            e["sentence_bleurt"] = b
        metrics["bleurt"], metrics["bleurt_signature"] = sum(per_clip) / len(per_clip), scorer.signature
    return metrics


def _write_json(path: str, obj):
    write_output(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def write_output(path: str, text: str):
    """One output file, complete or not at all (signllava/atomic.py): a full disk leaves an earlier file of that
    name as it was, and says so in one line."""
    from signllava.faults import write_failure
    try:
        write_atomic(path, text)
    except OSError as e:
        raise RunError(f"{path}: not written ({write_failure(e, Path(path).parent) or e}); a file there before is "
                       f"as it was") from None


OUTPUT_FLAGS = ("output", "metrics_out", "report")


def output_problems(args) -> list[str]:
    """Every path this run will write, checked before any work (a run of hours must not end on a path it
    cannot write): not a folder, no file on its way, a folder we may write in, no two flags on one file."""
    paths = [(f"--{n}", getattr(args, n)) for n in OUTPUT_FLAGS if getattr(args, n)]
    if args.score_only:
        paths.append(("--score_only", args.score_only))       # rewritten with the sentence scores
    return outputs_problems(paths)


def init_ranks(device_arg: str | None) -> tuple[int, int, torch.device]:
    """(rank, world, device). Under a launcher (deepspeed / torchrun set WORLD_SIZE > 1) each rank takes its
    own GPU and a share of the clips; a plain run is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device_arg) if device_arg else default_device()
    cuda = torch.cuda.is_available() and device_arg != "cpu"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank = torch.distributed.get_rank()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    return rank, world, device


def absent_modalities(cfg: SignConfig, given: str | None) -> list[str]:
    """The trained modalities --modalities leaves out: each gets its learned absent row."""
    if not given:
        return []
    names = [m.strip() for m in given.split(",") if m.strip()]
    unknown = [m for m in names if m not in cfg.modalities]
    if unknown:
        raise CheckpointError(f"--modalities {', '.join(unknown)}: not trained by this checkpoint "
                              f"(it knows {', '.join(cfg.modalities)})")
    left_out = [m for m in cfg.modalities if m not in names]
    if left_out and not cfg.modality_embeddings:
        raise CheckpointError(f"--modalities {given}: this checkpoint predates learned absent rows; it needs every "
                              f"modality it was trained with ({', '.join(cfg.modalities)})")
    return left_out


def run(args) -> int:
    from model import load_tokenizer
    rank, world, device = init_ranks(args.device)
    ckpt, cfg = load_config(args.checkpoint)
    tokenizer, _ = load_tokenizer(cfg.tokenizer, cfg.chat_template)
    ids = special_ids(tokenizer)
    builder = PromptBuilder(tokenizer, ids["markers"], ids["pad"], system_prompt=cfg.system_prompt)
    mode, cw, pw = context_policy(cfg, args.context, args.context_window, args.prelude_window, args.task)
    # The data is checked against the checkpoint before the (possibly large) model is loaded.
    ds = generation_dataset(data_paths(args), args.split, builder, cfg, mode, cw, pw, args.task, args.seed,
                            absent=tuple(absent_modalities(cfg, args.modalities)))
    indices = list(range(len(ds)))[:args.limit or None]
    if mode != "none" and args.task == "translation" and cw == 0 and pw == 0:
        log.warning("--context %s has no effect: the context windows are 0 (the checkpoint was trained without "
                    "context; set --context_window/--prelude_window to override)", mode)

    check_metric_packages()
    if args.bleurt:         # a wrong path or id is found before the generation, not after it
        from signllava.bleurt import resolve
        resolve(args.bleurt)
    tr = Translator.load(ckpt, cfg, tokenizer, device)
    tr.decode_steps = args.decode_steps or tr.decode_steps
    tr.no_repeat_ngram_size = args.no_repeat_ngram_size
    mine = share_by_video(ds, indices, rank, world)
    log.info("checkpoint %s (stage %d), %s on %s; %d clips of %s/%s (%d ranks), context %s (window %d, prelude %d)",
             ckpt, cfg.stage, ",".join(cfg.modalities), device, len(indices), Path(args.data_dir).name, args.split,
             world, mode, cw, pw)
    results = generate_split(tr, ds, mine, task=args.task, predicted=mode == "predicted",
                             batch_size=args.batch_size, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                             min_new_tokens=args.min_new_tokens, num_workers=args.num_workers, progress=rank == 0)
    results = gather_results(results, world)
    if rank != 0:
        return 0
    if not results:
        raise DataError(f"{args.data_dir}: no clip of split {args.split!r} could be generated for task {args.task}")
    output = build_output(ds, results, args.task)
    metrics = score_output(output, args.task, args.bootstrap, args.bleurt, args.bleurt_batch_size)
    _write_json(args.output, output)
    metrics.update(generation_record(args, ckpt, mode, cw, pw, world, tr.decode_steps))
    finish(args, output, metrics)
    return 0


# How an output was generated, as its metrics JSON records it: what --score_only keeps from an earlier metrics
# file of the same output (the scores it recomputes; anything else there -- an interval, BLEURT -- may be stale).
GENERATION_KEYS = ("output", "split", "checkpoint", "data_dir", "annotation_file", "features", "context",
                   "context_window", "prelude_window", "num_beams", "max_new_tokens", "min_new_tokens",
                   "no_repeat_ngram_size", "limit", "ranks", "decode_steps")


def generation_record(args, ckpt, mode: str, cw: int, pw: int, world: int, decode_steps: str) -> dict:
    """GENERATION_KEYS of one generation run."""
    return {"output": str(Path(args.output).resolve()), "split": args.split, "checkpoint": str(ckpt),
            "data_dir": str(args.data_dir), "annotation_file": args.annotation_file, "features": args.features,
            "context": mode if mode in ("none", "gold", "predicted") else f"file:{mode}",
            "context_window": cw, "prelude_window": pw, "num_beams": args.num_beams,
            "max_new_tokens": args.max_new_tokens, "min_new_tokens": args.min_new_tokens,
            "no_repeat_ngram_size": args.no_repeat_ngram_size, "limit": args.limit, "ranks": world,
            "decode_steps": decode_steps}


def finish(args, output: dict, metrics: dict):
    """Write the metrics JSON and the HTML report when asked; print the table."""
    if args.metrics_out:
        _write_json(args.metrics_out, metrics)
    if args.report:
        from signllava.report import render
        write_output(args.report, render(output, metrics))
    print(format_table(metrics))


def earlier_generation(metrics_out: str | None, output: Path) -> dict:
    """How `output` was generated, from an earlier metrics file at --metrics_out that says it describes that very
    output: its GENERATION_KEYS only. Another output's metrics (or one that names none) give nothing, said in the
    log, so that a re-scored file never carries another run's checkpoint or beams."""
    if not metrics_out or not Path(metrics_out).is_file():
        return {}
    try:
        before = json.loads(Path(metrics_out).read_text(encoding="utf-8"))
        if not isinstance(before, dict):
            raise ValueError(f"holds a {type(before).__name__}, not a metrics object")
    except (OSError, ValueError) as e:
        raise DataError(f"--metrics_out {metrics_out}: an earlier file there is not metrics JSON ({e}); move "
                        f"it away or give another path") from None
    described = before.get("output")
    if not isinstance(described, str) or os.path.realpath(described) != os.path.realpath(output):
        log.warning("--metrics_out %s: the earlier file there describes %s, not %s: it is replaced, and how the "
                    "output was generated is not recorded", metrics_out, brief(described, 80), output)
        return {}
    return {k: before[k] for k in GENERATION_KEYS if k in before}


def score_only(args) -> int:
    """Re-score an existing output JSON: sentence scores written back into it, corpus metrics printed (and
    written to --metrics_out, keeping what an earlier metrics file there says about how it was generated)."""
    path = Path(args.score_only)
    try:
        output = check_output_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise DataError(f"--score_only {path}: {e}") from None
    metrics = {**earlier_generation(args.metrics_out, path),
               **score_output(output, args.task, args.bootstrap, args.bleurt, args.bleurt_batch_size),
               "output": str(path.resolve())}
    _write_json(str(path), output)
    finish(args, output, metrics)
    return 0


def parser() -> argparse.ArgumentParser:
    from data import add_path_args
    p = make_parser(__doc__)
    p.add_argument("--checkpoint", help="stage-1/2 output dir or checkpoint dir")
    p.add_argument("--data_dir", help="the dataset (the Sign LLaVA layout, or with --annotation_file / --features)")
    add_path_args(p)
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"], help="the split translated")
    p.add_argument("--output", help="annotation-shaped JSON with a 'hypothesis' per clip (and its sentence scores)")
    p.add_argument("--metrics_out", help="metrics JSON")
    p.add_argument("--report", metavar="OUT.html", help="a self-contained HTML page of the scores and every clip, "
                                                        "worst first, filterable by video and text")
    p.add_argument("--score_only", metavar="OUT.json", help="re-score an existing --output JSON; no generation")
    p.add_argument("--num_beams", type=int, default=5, help="beam search width (1: greedy)")
    p.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS, help="longest hypothesis in tokens")
    p.add_argument("--min_new_tokens", type=int, default=0, help="the original's min_length (0: none)")
    p.add_argument("--no_repeat_ngram_size", type=int, default=0, metavar="N",
                   help="forbid any N-gram of tokens twice in a hypothesis: cuts an under-trained model's loops, "
                        "which run to --max_new_tokens and weigh heavily in corpus BLEU (0: off, as the original)")
    p.add_argument("--batch_size", type=int, default=16, help="clips translated together")
    p.add_argument("--context", metavar="none|gold|predicted|FILE",
                   help="context sentences for the translation task (default: predicted when the checkpoint was "
                        "trained with a context window, else none; gold only when asked: it does not exist at "
                        "test time). The windows decide how many")
    p.add_argument("--context_window", type=int, help="preceding sentences (default: the checkpoint's)")
    p.add_argument("--prelude_window", type=int, help="first sentences of the video (default: the checkpoint's)")
    p.add_argument("--task", default="translation", choices=TASKS, help="the prompt every clip gets")
    p.add_argument("--modalities", help="comma-separated subset of the checkpoint's modalities to read; the others "
                                        "get their learned absent rows (default: all it was trained with)")
    p.add_argument("--limit", type=int, default=0, help="only the first N clips (0: all)")
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers reading features")
    p.add_argument("--seed", type=int, default=42, help="seed of the yes/no task questions")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--decode_steps", choices=DECODE_MODES, help="beam-search steps: graph (CUDA graphs; the default on "
                   "a GPU), static (the same fixed buffers, no graph), eager (the default on a CPU)")
    p.add_argument("--bootstrap", type=int, default=N_BOOTSTRAP, metavar="N",
                   help="resamples of sacreBLEU's bootstrap for the 95 %% intervals on BLEU and chrF (0: none)")
    p.add_argument("--bleurt", metavar="PATH|ID", help="also score BLEURT with this checkpoint: a PyTorch BLEURT-20 "
                   "(-D3/-D6/-D12) directory or hub id in bleurt-pytorch's layout, e.g. lucadiliello/BLEURT-20; run "
                   "through transformers' RemBERT classes (signllava/bleurt.py)")
    p.add_argument("--bleurt_batch_size", type=int, default=16, help="sentence pairs per BLEURT forward")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    add_config_arg(p)
    return p


def data_paths(args) -> DataPaths:
    return DataPaths.from_specs(args.data_dir, args.annotation_file, args.features)


def main(argv=None) -> int:
    p = parser()
    args = parse_args(p, argv)
    problems = range_problems(args, at_least_one=("num_beams", "max_new_tokens", "batch_size", "bleurt_batch_size"),
                              non_negative=("context_window", "prelude_window", "limit", "num_workers",
                                            "min_new_tokens", "no_repeat_ngram_size", "bootstrap"))
    if args.min_new_tokens > args.max_new_tokens:
        problems.append("--min_new_tokens must not exceed --max_new_tokens")
    if args.score_only:
        if not Path(args.score_only).is_file():
            problems.append(f"--score_only {args.score_only}: no such file")
    else:
        problems += [f"--{n} is required (unless --score_only)" for n in ("checkpoint", "data_dir", "output")
                     if getattr(args, n) is None]
    problems += output_problems(args)
    if args.context not in (None, "none", "gold", "predicted") and not Path(args.context).is_file():
        problems.append(f"--context {args.context}: not none, gold, predicted or an existing output JSON")
    if args.data_dir and not args.score_only:      # before the model loads
        problems += data_problems(args.data_dir, args.annotation_file, args.features, [args.split])
    if problems:
        p.error("; ".join(problems))
    return run_command(lambda: score_only(args) if args.score_only else run(args))


if __name__ == "__main__":
    sys.exit(main())
