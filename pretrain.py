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

from training import Context, Stage, add_common_args, barrier, run, validate_args

log = logging.getLogger("signllava")


def resolve_base(ctx: Context):
    if ctx.args.model:
        return ctx.args.model, ctx.args.model, None, None
    base = ctx.out / "base_model"
    if ctx.rank == 0 and not base.exists():
        from layout import load_annotation
        from tiny_llm import build_default_llm
        ann = load_annotation(ctx.data_dir / "annotation.train.json")
        texts = [t for c in ann.clips.values() for t in [c.translation, *c.paraphrases]]
        log.info("no --model: building the embedded tiny Llama and tokenizer into %s", base)
        build_default_llm(base, texts, seed=ctx.args.seed)
    barrier()
    return str(base.resolve()), str(base.resolve()), None, None


def build(ctx: Context, cfg, tokenizer, _prev_state):
    from model import assemble
    return assemble(cfg, tokenizer, ctx.device, ctx.dtype, zero3=ctx.zero3,
                    gradient_checkpointing=ctx.args.gradient_checkpointing, label_smoothing=ctx.args.label_smoothing)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, lr=1e-3)
    args = p.parse_args(argv)
    validate_args(p, args)
    return run(args, Stage(1, resolve_base, build))


if __name__ == "__main__":
    sys.exit(main())
