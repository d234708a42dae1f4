"""Merge a stage-2 LoRA adapter into a 16-bit copy of the base model, for inference without peft or
bitsandbytes.

    python export.py --checkpoint runs/stage2 --output_dir runs/stage2-merged [--dtype bf16|fp32]

Writes OUT/model/ (a plain HF model + tokenizer), OUT/projectors.safetensors and OUT/config.json, so
`generate.py --checkpoint OUT` and `Translator.from_checkpoint(OUT)` load it like any checkpoint.
The LoRA was trained against the nf4-quantised base and is merged into the 16-bit base: the usual
QLoRA approximation, small for real models (compare both with generate.py if it matters to you).
"""
import logging
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch

from signllava.checkpoint import ADAPTER_DIR, PROJECTORS_NAME
from signllava.cli import make_parser
from signllava.errors import CheckpointError, run_command
from model import SignConfig, fit_embeddings, load_adapter_strict, load_llm, load_tokenizer

log = logging.getLogger("signllava")


def export(checkpoint: str, output_dir: str, dtype: torch.dtype) -> Path:
    from signllava.checkpoint import resolve_checkpoint
    ckpt = resolve_checkpoint(checkpoint)
    cfg = SignConfig.load(ckpt)
    if not cfg.lora or not (ckpt / ADAPTER_DIR).is_dir():
        raise CheckpointError(f"{ckpt}: has no LoRA adapter to merge (a stage-1 checkpoint is already plain)")
    tok, _ = load_tokenizer(cfg.tokenizer, cfg.chat_template)
    llm = load_llm(cfg.base_model, 16, dtype, torch.device("cpu"))
    fit_embeddings(llm, tok)
    merged = load_adapter_strict(llm, ckpt / ADAPTER_DIR).merge_and_unload()
    out = Path(output_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "model").mkdir(parents=True)
    merged.save_pretrained(str(tmp / "model"))
    tok.save_pretrained(str(tmp / "model"))
    shutil.copy2(ckpt / PROJECTORS_NAME, tmp / PROJECTORS_NAME)
    replace(cfg, base_model=str((tmp / "model").resolve()), tokenizer=str((tmp / "model").resolve()),
            bits=16, lora=None).save(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main(argv=None) -> int:
    p = make_parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="stage-2 output dir or checkpoint dir")
    p.add_argument("--output_dir", required=True, help="the merged HF model directory written")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="dtype of the merged weights")
    args = p.parse_args(argv)
    return run_command(lambda: merge(args))


def merge(args) -> int:
    out = export(args.checkpoint, args.output_dir, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    log.info("merged model written to %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
