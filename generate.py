"""Translate a split with a trained checkpoint (batched beam search from a shared prefill) and score it.

    python generate.py --checkpoint C --data_dir D --split dev --output OUT.json --metrics_out METRICS.json
                       [--num_beams 5] [--max_new_tokens 64] [--batch_size 16]
                       [--context none|gold|predicted|FILE] [--context_window N] [--prelude_window P]
                       [--task translation|one_word_present|multi_word_present|is_reversed] [--limit N]

C is a stage-1 or stage-2 output dir (its latest complete checkpoint) or a checkpoint dir. Everything that
must match training -- base model, tokenizer, modalities, dims, projector types, frame cap, default context
windows -- comes from the checkpoint's config.json; a stage-2 checkpoint brings its LoRA adapter.

Context (translation task):
    none       no preceding sentences
    gold       the reference translations of the preceding clips
    predicted  the model's own outputs for the preceding clips of the same video. Clips are generated in
               rounds: round k holds the k-th clip of every video, so batches run across videos.
    FILE       the "hypothesis" fields of an earlier output JSON of this script
Windows default to the checkpoint's (what it was trained with); clips with no features never give context.

OUT.json has the annotation layout, {video: {"clip_order": [...], clip: {"translation", "paraphrases",
"keywords", "hypothesis"}}} (+ "reference" and "prompt" for the yes/no tasks), holding the generated clips.
METRICS.json: sacreBLEU corpus BLEU (with its signature), chrF, n; accuracy/precision/recall/F1 of 'yes'
for the yes/no tasks.

Inference from Python:

    from generate import Translator
    tr = Translator.from_checkpoint("runs/stage2")
    tr.translate({"mae": mae_array, "pose": pose_array}, context=["Earlier sentence."], num_beams=5)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from model import SignConfig, compute_dtype
from signllava.checkpoint import ADAPTER_DIR, PROJECTORS_NAME
from signllava.errors import CheckpointError, DataError, range_problems, run_command
from signllava.layout import load_annotation
from signllava.prompts import TASKS, PromptBuilder, context_ids, special_ids, translation_prompt

log = logging.getLogger("signllava")
YES_NO_TASKS = ("one_word_present", "multi_word_present", "is_reversed")


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
                               {m: t.to(dev) for m, t in batch["frame_index"].items()})
        return emb, batch["attention_mask"].to(dev)

    # -- the one generation path
    @torch.inference_mode()
    def generate_ids(self, items: list[dict], num_beams: int = 5, max_new_tokens: int = 64) -> list[list[int]]:
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
                                          max_new_tokens=max_new_tokens, eos_token_id=self.ids["eot"],
                                          pad_token_id=self.ids["pad"], use_cache=True, **{key: cache})
        eot = self.ids["eot"]
        return [row[:row.index(eot)] if eot in row else row for row in out.tolist()]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def generate_items(self, items: list[dict], num_beams: int = 5, max_new_tokens: int = 64) -> list[str]:
        return [self.decode(r) for r in self.generate_ids(items, num_beams, max_new_tokens)]

    # -- the API
    def make_item(self, features: dict[str, np.ndarray], prompt: str) -> dict:
        """A sample from raw features (any subset of the checkpoint's modalities) and a prompt text."""
        from data import cap_frames
        if not features:
            raise ValueError(f"no features given (the checkpoint knows {', '.join(self.cfg.modalities)})")
        unknown = [m for m in features if m not in self.cfg.modalities]
        if unknown:
            raise ValueError(f"modality {', '.join(map(repr, unknown))} was not trained by this checkpoint "
                             f"(it knows {', '.join(self.cfg.modalities)})")
        mods = [m for m in self.cfg.modalities if m in features]
        feats = []
        for m in mods:
            a = np.asarray(features[m])
            if a.ndim != 2 or a.shape[1] != self.cfg.dims[m]:
                raise ValueError(f"modality {m!r}: features of shape {tuple(a.shape)}, the checkpoint expects "
                                 f"[T, {self.cfg.dims[m]}]")
            if a.shape[0] == 0:
                raise ValueError(f"modality {m!r}: zero frames")
            if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
                raise ValueError(f"modality {m!r}: features must be finite floating-point values")
            feats.append(cap_frames(a, self.cfg.max_frames, self.cfg.frame_cap))
        ids, labels, seg = self.builder.build([len(f) for f in feats], prompt, None)
        return {"input_ids": ids, "labels": labels, "segments": seg, "features": feats, "modalities": mods,
                "video": None, "clip": None, "task": "translation", "prompt": prompt, "answer": None}

    def context_prompt(self, context: list[str] | None) -> str:
        """Training's policy: `context` is the video's preceding sentences in time order; the checkpoint's
        windows pick the first `prelude_window` and the last `context_window` of them."""
        context = list(context or [])
        pick = context_ids(len(context), self.context_window, self.prelude_window)
        return translation_prompt([context[i] for i in pick if context[i]])

    def translate(self, features: dict[str, np.ndarray], context: list[str] | None = None,
                  num_beams: int = 5, max_new_tokens: int = 64) -> str:
        item = self.make_item(features, self.context_prompt(context))
        return self.generate_items([item], num_beams, max_new_tokens)[0]


# ------------------------------------------------------------------------------------------- metrics
def _answers(text: str) -> list[str]:
    return [a.strip().strip(".").lower() for a in text.split(",")]


def yes_no_metrics(hyps: list[str], refs: list[str]) -> dict:
    """Over the comma-separated answers, aligned by position; positive class 'yes'. A missing or
    non-yes prediction counts as 'not yes'."""
    tp = fp = fn = correct = total = 0
    for h, r in zip(hyps, refs):
        hs, rs = _answers(h), _answers(r)
        for j, ra in enumerate(rs):
            ha = hs[j] if j < len(hs) else ""
            total += 1
            correct += ha == ra
            tp += ha == "yes" and ra == "yes"
            fp += ha == "yes" and ra != "yes"
            fn += ha != "yes" and ra == "yes"
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": correct / total if total else 0.0, "precision": prec, "recall": rec,
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0, "answers": total}


def compute_metrics(hyps: list[str], refs: list[str], task: str = "translation") -> dict:
    from sacrebleu.metrics import BLEU, CHRF
    bleu, chrf = BLEU(), CHRF()
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    out = {"task": task, "n": len(hyps), "bleu": b.score, "chrf": c.score,
           "signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}
    if task in YES_NO_TASKS:
        out.update(yes_no_metrics(hyps, refs))
    return out


def bleurt_score(checkpoint: str, hyps: list[str], refs: list[str]) -> float | None:
    try:
        from bleurt import score as bleurt_lib
    except Exception:
        print("warning: --bleurt_checkpoint given but the bleurt package does not import; BLEURT skipped", file=sys.stderr)
        return None
    scores = bleurt_lib.BleurtScorer(checkpoint).score(references=refs, candidates=hyps)
    return float(np.mean(scores)) if scores else 0.0


def format_table(m: dict) -> str:
    rows = [("BLEU", m["bleu"], m["signature"]), ("chrF", m["chrf"], m["chrf_signature"])]
    if "bleurt" in m:
        rows.append(("BLEURT", m["bleurt"], ""))
    for k in ("accuracy", "precision", "recall", "f1"):
        if k in m:
            rows.append((k, 100 * m[k], "%"))
    head = f"{m.get('split', '')} · task {m['task']} · {m['n']} clips"
    if m["task"] == "translation" and "context" in m:
        head += f" · context {m['context']}"
    return "\n".join([head] + [f"  {name:<10}{val:7.2f}  {note}".rstrip() for name, val, note in rows])


# ------------------------------------------------------------------------------------------- the split
def prompt_length(ds, i: int) -> int:
    """Approximate prompt tokens of clip i: its segments and its context sentences (about 4 characters a token)."""
    v, _, pos = ds.items[i]
    return ds.frame_tokens(i) + sum(len(t) for t in ds.context_for(v, pos)) // 4


def plan_rounds(ds, indices: list[int], predicted: bool) -> list[list[int]]:
    """One set of everything, or (predicted context) round k = the k-th generated clip of every video."""
    if not predicted:
        return [indices]
    by_video: dict[str, list[int]] = {}
    for i in indices:
        by_video.setdefault(ds.items[i][0], []).append(i)
    for lst in by_video.values():
        lst.sort(key=lambda i: ds.items[i][2])
    n = max(len(lst) for lst in by_video.values())
    return [[lst[k] for lst in by_video.values() if len(lst) > k] for k in range(n)]


def generate_split(tr: Translator, ds, indices: list[int], *, task: str, predicted: bool, batch_size: int,
                   num_beams: int, max_new_tokens: int, num_workers: int = 0) -> dict[tuple[str, str], dict]:
    """(video, clip) -> {"hypothesis", "reference", "prompt"} for every clip that carries `task`."""
    from tqdm import tqdm
    from data import make_loader
    results: dict[tuple[str, str], dict] = {}
    skipped = 0
    bar = tqdm(total=len(indices), desc="generate", dynamic_ncols=True, file=sys.stderr)
    for rnd in plan_rounds(ds, indices, predicted):
        # Lengths are read now: in predicted mode the context of this round only exists now.
        order = sorted(rnd, key=lambda i: -prompt_length(ds, i))
        batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
        for items in make_loader(ds, batches, _as_list, num_workers, pin_memory=False):
            keep = [it for it in items if it["task"] == task]
            skipped += len(items) - len(keep)
            for it, hyp in zip(keep, tr.generate_items(keep, num_beams, max_new_tokens)):
                key = (it["video"], it["clip"])
                results[key] = {"hypothesis": hyp, "reference": it["answer"], "prompt": it["prompt"]}
                if predicted:
                    ds.context_texts[key] = hyp
            bar.update(len(items))
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
            vd[c] = entry
        out[video] = vd
    return out


def _write_json(path: str, obj):
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def run(args) -> int:
    from data import DataOptions, SignDataset
    from model import load_tokenizer
    ckpt, cfg = load_config(args.checkpoint)
    tokenizer, _ = load_tokenizer(cfg.tokenizer, cfg.chat_template)
    ids = special_ids(tokenizer)
    builder = PromptBuilder(tokenizer, ids["markers"], ids["pad"], system_prompt=cfg.system_prompt)

    mode = args.context
    if mode == "none":
        cw = pw = 0
    else:
        cw = cfg.context_window if args.context_window is None else args.context_window
        pw = cfg.prelude_window if args.prelude_window is None else args.prelude_window
    opts = DataOptions(modalities=list(cfg.modalities), max_frames=cfg.max_frames, frame_cap=cfg.frame_cap,
                       context_window=cw, prelude_window=pw, task_weights={args.task: 1.0}, seed=args.seed)
    # The data is checked against the checkpoint before the (possibly large) model is loaded.
    ds = SignDataset(args.data_dir, args.split, builder, opts, train=False, expected_dims=cfg.dims)
    ds.generation, ds.fixed_task = True, args.task
    predicted = mode == "predicted"
    if predicted:
        ds.context_texts = {}
    elif mode not in ("none", "gold"):
        ds.context_texts = read_hypotheses(Path(mode))
    indices = list(range(len(ds)))[:args.limit or None]
    if mode != "none" and args.task == "translation" and cw == 0 and pw == 0:
        log.warning("--context %s has no effect: the context windows are 0 (the checkpoint was trained without "
                    "context; set --context_window/--prelude_window to override)", mode)

    device = torch.device(args.device) if args.device else default_device()
    tr = Translator.load(ckpt, cfg, tokenizer, device)
    tr.decode_steps = args.decode_steps or tr.decode_steps
    log.info("checkpoint %s (stage %d), %s on %s; %d clips of %s/%s, context %s (window %d, prelude %d)",
             ckpt, cfg.stage, ",".join(cfg.modalities), device, len(indices), Path(args.data_dir).name, args.split,
             mode, cw, pw)
    results = generate_split(tr, ds, indices, task=args.task, predicted=predicted, batch_size=args.batch_size,
                             num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, num_workers=args.num_workers)
    if not results:
        raise DataError(f"{args.data_dir}: no clip of split {args.split!r} could be generated for task {args.task}")
    output = build_output(ds, results, args.task)
    _write_json(args.output, output)

    keys = [(v, c) for v, vd in output.items() for c in vd["clip_order"]]
    hyps = [results[k]["hypothesis"] for k in keys]
    refs = [results[k]["reference"] for k in keys]
    metrics = compute_metrics(hyps, refs, args.task)
    if args.bleurt_checkpoint:
        b = bleurt_score(args.bleurt_checkpoint, hyps, refs)
        if b is not None:
            metrics["bleurt"] = b
    metrics.update({"split": args.split, "checkpoint": str(ckpt), "data_dir": str(args.data_dir),
                    "context": mode if mode in ("none", "gold", "predicted") else f"file:{mode}",
                    "context_window": cw, "prelude_window": pw, "num_beams": args.num_beams,
                    "max_new_tokens": args.max_new_tokens})
    if args.metrics_out:
        _write_json(args.metrics_out, metrics)
    print(format_table(metrics))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="stage-1/2 output dir or checkpoint dir")
    p.add_argument("--data_dir", required=True)
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    p.add_argument("--output", required=True, help="annotation-shaped JSON with a 'hypothesis' per clip")
    p.add_argument("--metrics_out", help="metrics JSON")
    p.add_argument("--num_beams", type=int, default=5)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--context", default="gold", metavar="none|gold|predicted|FILE",
                   help="context sentences for the translation task (default: gold; the windows decide how many)")
    p.add_argument("--context_window", type=int, help="preceding sentences (default: the checkpoint's)")
    p.add_argument("--prelude_window", type=int, help="first sentences of the video (default: the checkpoint's)")
    p.add_argument("--task", default="translation", choices=TASKS)
    p.add_argument("--limit", type=int, default=0, help="only the first N clips (0: all)")
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers reading features")
    p.add_argument("--seed", type=int, default=42, help="seed of the yes/no task questions")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--decode_steps", choices=DECODE_MODES, help="beam-search steps: graph (CUDA graphs; the default on "
                   "a GPU), static (the same fixed buffers, no graph), eager (the default on a CPU)")
    p.add_argument("--bleurt_checkpoint", metavar="PATH", help="also score BLEURT with this checkpoint (needs the bleurt package)")
    args = p.parse_args(argv)
    problems = range_problems(args, at_least_one=("num_beams", "max_new_tokens", "batch_size"),
                              non_negative=("context_window", "prelude_window", "limit", "num_workers"))
    if args.context not in ("none", "gold", "predicted") and not Path(args.context).is_file():
        problems.append(f"--context {args.context}: not none, gold, predicted or an existing output JSON")
    if problems:
        p.error("; ".join(problems))
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
