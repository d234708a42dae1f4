"""Stage 1: the LLM stays frozen; the per-modality projectors (and the two marker rows) learn to map
sign-language features into its embedding space.

    deepspeed pretrain.py --data_dir D --output_dir O [--model meta-llama/Meta-Llama-3-8B-Instruct] ...
    python pretrain.py --output_dir O            # built-in demo language and embedded tiny Llama

With no --model, a small random-init Llama and a BPE tokenizer trained on the data's sentences are
written to O/base_model and used by every later stage.
"""
import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from model import assemble, load_tokenizer
from signllava.cli import make_parser
from signllava.config import parse_args
from signllava.errors import DataError, RunError, run_command
from signllava.prompts import resolve_template
from training import (RunEnv, add_common_args, barrier, fit, load_data, model_config, raise_everywhere, setup_run,
                      validate_args)

log = logging.getLogger("signllava")


def embedded_base(env: RunEnv) -> str:
    """The tiny Llama and tokenizer in O/base_model, built once (by rank 0) from the training sentences."""
    base = env.out / "base_model"
    failure = None
    if env.rank == 0 and not base.exists():
        try:
            write_embedded_base(base, env.paths.annotation("train"), env.args.seed)
        except (DataError, RunError) as e:
            failure = e
    raise_everywhere(failure, env.world)
    barrier()
    return str(base.resolve())


def write_embedded_base(base: Path, annotation: Path, seed: int):
    """Build O/base_model (complete or absent: demo.build_default_llm writes it beside and renames it in); a file
    system that refuses it (a full disk, permissions) is one line, and nothing of it is left behind."""
    from signllava.demo import build_default_llm
    from signllava.faults import write_failure
    from signllava.layout import load_annotation
    ann = load_annotation(annotation)
    texts = [t for c in ann.clips.values() for t in [c.translation, *c.paraphrases]]
    log.info("no --model: building the embedded tiny Llama and tokenizer into %s", base)
    try:
        build_default_llm(base, texts, seed=seed)
    except Exception as e:
        why = write_failure(e, base.parent)
        if why is None:
            raise
        raise RunError(f"{base}: the embedded base model could not be written ({why}); nothing of it was kept, the "
                       f"next start builds it again") from None


def train(args) -> int:
    env = setup_run(args)
    base = args.model or embedded_base(env)
    tokenizer, added = load_tokenizer(base, resolve_template(args.chat_template))
    data = load_data(env, tokenizer, base_model=base)
    cfg = model_config(env, data, stage=1, base_model=base, tokenizer_path=base, added_tokens=added,
                       chat_template=tokenizer.chat_template, standardize_features=args.standardize_features)
    model = assemble(cfg, tokenizer, env.device, env.dtype, zero3=env.zero3,
                     gradient_checkpointing=args.gradient_checkpointing, label_smoothing=args.label_smoothing,
                     compile_layers=args.compile_layers,
                     activation_memory_budget=args.activation_memory_budget, fp8=args.fp8)
    if args.standardize_features:
        stats = data.train.feature_statistics()
        model.standardize_from(stats)
        log.info("features standardised from the training split: %s", ", ".join(
            f"{m} (std {np.median(std):.3g} median over {len(std)} dims)" for m, (_, std) in stats.items()))
    return fit(env, model, cfg, data)


def parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    add_common_args(p, lr=1e-3)
    p.add_argument("--standardize_features", action="store_true",
                   help="put a per-dimension scale and shift in front of each projector, set from the training "
                        "split's mean and std so every feature dimension enters standardised, then trained with "
                        "the projector; stage 2 and generation inherit it (see model.FeatureScale)")
    return p


def main(argv=None) -> int:
    p = parser()
    args = parse_args(p, argv)
    validate_args(p, args)
    return run_command(lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
