"""Merge a stage-2 LoRA adapter into a 16-bit copy of the base model, for inference without peft or
bitsandbytes.

    python export.py --checkpoint runs/stage2 --output_dir runs/stage2-merged [--dtype bf16|fp32] [--overwrite]
                     [--metrics M.json ...]

Writes OUT/model/ (a plain HF model + tokenizer), OUT/projectors.safetensors and OUT/config.json, so
`generate.py --checkpoint OUT` and `Translator.from_checkpoint(OUT)` load it like any checkpoint, and
OUT/README.md, a model card in the Hugging Face layout (signllava/model_card.py): the folder is ready for
`huggingface-cli upload ORG/NAME OUT`. `--metrics dev.metrics.json test.metrics.json` adds generate.py's scores.
The LoRA was trained against the nf4-quantised base and is merged into the 16-bit base: the usual
QLoRA approximation, small for real models (compare both with generate.py if it matters to you).

OUT is built beside itself and renamed into place, so it is either the old folder or the whole new export.
An earlier export in OUT is replaced. Any other non-empty OUT is refused unless --overwrite says it may go;
a training run, the checkpoint being exported (or a folder holding it), a symbolic link or a file never are.
Every check is made before the merge starts.
"""
import logging
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch

from signllava import checkpoint
from signllava.atomic import building_dir, parent_problem, replace_dir
from signllava.checkpoint import ADAPTER_DIR, CONFIG_NAME, PROJECTORS_NAME
from signllava.cli import make_parser
from signllava.errors import CheckpointError, RunError, run_command
from signllava.model_card import read_metrics_file, write_model_card
from signllava.run_lock import LOCK_NAME
from model import SignConfig, fit_embeddings, load_adapter_strict, load_llm, load_tokenizer

log = logging.getLogger("signllava")
MODEL_DIR = "model"
CARD_NAME = "README.md"                                       # signllava/model_card.py
EXPORT_NAMES = {CONFIG_NAME, PROJECTORS_NAME, MODEL_DIR, CARD_NAME}   # what an export holds, and all it holds


def _inside(inner: Path, outer: Path) -> bool:
    inner, outer = inner.resolve(), outer.resolve()
    return inner == outer or outer in inner.parents


def output_refusal(out: Path, ckpt: Path, overwrite: bool) -> str | None:
    """Why export must not write OUT (None: it may, replacing what is there). Export never deletes what it did
    not write unless told to, and never a run or its own input even then."""
    if out.is_symlink():
        return f"--output_dir {out}: is a symbolic link (give the folder it names, {out.resolve()})"
    if out.exists() and not out.is_dir():
        return f"--output_dir {out}: exists and is not a directory"
    if _inside(ckpt, out) or _inside(out, ckpt):
        return f"--output_dir {out}: holds or lies inside the checkpoint being exported ({ckpt}); give another folder"
    why = parent_problem(out)
    if why:
        return f"--output_dir {out}: {why}"
    if not out.is_dir():
        return None
    names = {p.name for p in out.iterdir()}
    if not names or (EXPORT_NAMES - {CARD_NAME} <= names <= EXPORT_NAMES):   # empty, or an earlier export: replaced
        return None
    if checkpoint.complete_checkpoints(out) or names & {*checkpoint.POINTERS, LOCK_NAME}:
        return f"--output_dir {out}: holds a training run; export never replaces one (give another folder)"
    if not overwrite:
        return (f"--output_dir {out}: not empty and not an earlier export ({len(names)} entries); export never "
                f"deletes what it did not write (give an empty or new folder, or --overwrite to replace it)")
    return None


def export(checkpoint_path: str, output_dir: str, dtype: torch.dtype, overwrite: bool = False,
           metrics_files: list[Path] = ()) -> Path:
    ckpt = checkpoint.resolve_checkpoint(checkpoint_path)
    cfg = SignConfig.load(ckpt)
    if not cfg.lora or not (ckpt / ADAPTER_DIR).is_dir():
        raise CheckpointError(f"{ckpt}: has no LoRA adapter to merge (a stage-1 checkpoint is already plain)")
    out = Path(output_dir)
    why = output_refusal(out, ckpt, overwrite)       # before the (long) merge
    if why:
        raise CheckpointError(why)
    for m in metrics_files:                          # the card's scores, also before the merge
        read_metrics_file(m, ckpt)
    tok, _ = load_tokenizer(cfg.tokenizer, cfg.chat_template)
    llm = load_llm(cfg.base_model, 16, dtype, torch.device("cpu"))
    fit_embeddings(llm, tok)
    merged = load_adapter_strict(llm, ckpt / ADAPTER_DIR).merge_and_unload()
    try:
        with building_dir(out) as tmp:
            merged.save_pretrained(str(tmp / MODEL_DIR))
            tok.save_pretrained(str(tmp / MODEL_DIR))
            shutil.copy2(ckpt / PROJECTORS_NAME, tmp / PROJECTORS_NAME)
            replace(cfg, base_model=str((tmp / MODEL_DIR).resolve()), tokenizer=str((tmp / MODEL_DIR).resolve()),
                    bits=16, lora=None).save(tmp)
            # The card names the base model and the recipe of the run the checkpoint came from (its args.yaml).
            run_dir = ckpt.parent if (ckpt.parent / "args.yaml").is_file() else None
            write_model_card(tmp, cfg, cfg.base_model, run_dir, list(metrics_files), adapter=False,
                             checkpoint_dir=ckpt)
            why = output_refusal(out, ckpt, overwrite)   # again: OUT may have changed during the merge
            if why:
                raise CheckpointError(why)
            replace_dir(tmp, out, replace_existing=True)
    except OSError as e:
        from signllava.faults import write_failure
        raise RunError(f"{out}: the export could not be written ({write_failure(e, out.parent) or e}); "
                       f"{out} is as it was") from None
    return out


def main(argv=None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="stage-2 output dir or checkpoint dir")
    p.add_argument("--output_dir", required=True, help="the merged HF model directory written")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of the merged weights")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty OUTPUT_DIR that is not an earlier export (never a training run)")
    p.add_argument("--metrics", nargs="*", default=[], metavar="M.json",
                   help="generate.py metrics JSONs (e.g. dev and test) whose scores the model card lists")
    args = p.parse_args(argv)
    missing = [m for m in args.metrics if not Path(m).is_file()]
    if missing:
        p.error(f"--metrics {missing[0]}: no such file")
    return run_command(lambda: merge(args))


def merge(args) -> int:
    out = export(args.checkpoint, args.output_dir, torch.bfloat16 if args.dtype == "bf16" else torch.float32,
                 args.overwrite, [Path(m) for m in args.metrics])
    log.info("merged model written to %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
