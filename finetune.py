"""Stage 2: QLoRA. The LLM is loaded in 4-bit (nf4, double quantisation) and frozen; LoRA adapters on
all its linear layers train together with the projectors loaded from stage 1.

    deepspeed finetune.py --projector STAGE1_OUTPUT --data_dir D --output_dir O [--bits 4|16] ...

--projector takes a stage-1 output dir (its latest complete checkpoint), a checkpoint dir, a
projectors.safetensors file, or the original Sign LLaVA's `mp_rank_00_model_states.pt`. Without
--model, the base model and tokenizer are the ones the stage-1 checkpoint names.
"""
import argparse
import logging
import sys
from pathlib import Path

from model import CONFIG_NAME, PROJECTORS_NAME, CheckpointError, SignConfig, read_projector_file, read_reference_states
from training import Context, Stage, add_common_args, run, validate_args

log = logging.getLogger("signllava")


def read_projector_source(path: str) -> tuple[SignConfig | None, dict, str]:
    """-> (config of the stage-1 run if known, projector state by our names, a description)."""
    from checkpoint import resolve_checkpoint
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"--projector {p}: no such file or directory")
    if p.is_file() and p.suffix == ".safetensors":
        cfg = SignConfig.load(p.parent) if (p.parent / CONFIG_NAME).is_file() else None
        return cfg, read_projector_file(p), str(p)
    if p.is_file() and p.suffix in (".pt", ".bin"):
        return None, read_reference_states(p), str(p)
    d = resolve_checkpoint(p)
    return SignConfig.load(d), read_projector_file(d / PROJECTORS_NAME), str(d / PROJECTORS_NAME)


def make_resolve_base(projector: str):
    def resolve_base(ctx: Context):
        prev_cfg, state, source = read_projector_source(projector)
        log.info("stage-1 projectors from %s", source)
        if ctx.args.model:
            base, tok = ctx.args.model, ctx.args.model
        elif prev_cfg is not None:
            base, tok = prev_cfg.base_model, prev_cfg.tokenizer
        else:
            raise CheckpointError(f"{source}: carries no config.json naming its base model; pass --model")
        if prev_cfg is None and not ctx.args.modalities:
            # A bare weights file says which modalities it has through its key names.
            mods = sorted({k.split(".")[1] for k in state if k.startswith("projectors.")})
            ctx.args.modalities = ",".join(mods)
        return base, tok, prev_cfg, (state, source)
    return resolve_base


def build(ctx: Context, cfg: SignConfig, tokenizer, prev):
    from model import assemble
    state, source = prev
    a = ctx.args
    cfg.bits = a.bits
    targets = a.lora_targets if a.lora_targets == "all-linear" else [t.strip() for t in a.lora_targets.split(",")]
    cfg.lora = {"r": a.lora_r, "lora_alpha": a.lora_alpha, "lora_dropout": a.lora_dropout, "target_modules": targets}
    model = assemble(cfg, tokenizer, ctx.device, ctx.dtype, zero3=ctx.zero3, adapter="new",
                     gradient_checkpointing=a.gradient_checkpointing, label_smoothing=a.label_smoothing)
    if "marker_embed.weight" not in state:
        log.warning("%s has no marker rows (trained with frozen embeddings): they start from their init", source)
        state = {**state, "marker_embed.weight": model.marker_embed.weight.detach().cpu()}
    model.load_projector_state(state, source)
    return model


def default_output_dir(projector: str) -> str:
    """`runs/x` or `runs/x/checkpoint-N` or `runs/x/checkpoint-N/projectors.safetensors` -> `runs/x-stage2`."""
    p = Path(projector).resolve()
    if p.is_file():
        p = p.parent
    if p.name.startswith("checkpoint-"):
        p = p.parent
    return str(p.with_name(p.name + "-stage2"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--projector", required=True, help="stage-1 output/checkpoint dir, projectors.safetensors, "
                                                      "or the original's mp_rank_00_model_states.pt")
    g = p.add_argument_group("QLoRA")
    g.add_argument("--bits", type=int, choices=[4, 16], default=4, help="4: nf4 + double quant base; 16: plain LoRA")
    g.add_argument("--lora_r", type=int, default=64)
    g.add_argument("--lora_alpha", type=float, default=16)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument("--lora_targets", default="all-linear",
                   help="'all-linear' (every linear layer of the LLM but lm_head: q,k,v,o,gate,up,down for Llama) "
                        "or a comma-separated list of module names")
    add_common_args(p, lr=2e-4, output_required=False,
                    output_help="default: beside the stage-1 run, '<its output dir>-stage2'")
    args = p.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = default_output_dir(args.projector)
    validate_args(p, args)
    return run(args, Stage(2, make_resolve_base(args.projector), build))


if __name__ == "__main__":
    sys.exit(main())
