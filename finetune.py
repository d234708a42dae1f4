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

from model import SignConfig, assemble, load_tokenizer, read_projector_file, read_reference_states
from signllava.checkpoint import CONFIG_NAME, PROJECTORS_NAME, resolve_checkpoint
from signllava.cli import make_parser
from signllava.config import parse_args
from signllava.errors import CheckpointError, run_command
from signllava.prompts import resolve_template
from training import add_common_args, fit, load_data, model_config, setup_run, validate_args

log = logging.getLogger("signllava")


def read_projector_source(path: str) -> tuple[SignConfig | None, dict, str]:
    """-> (config of the stage-1 run if known, projector state by our names, a description)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"--projector {p}: no such file or directory")
    if p.is_file() and p.suffix == ".safetensors":
        cfg = SignConfig.load(p.parent) if (p.parent / CONFIG_NAME).is_file() else None
        return warn_stage2(cfg, p), read_projector_file(p), str(p)
    if p.is_file() and p.suffix in (".pt", ".bin"):
        ours = own_checkpoint_of(p)
        if ours is not None:
            raise CheckpointError(f"--projector {p}: the DeepSpeed engine state inside this trainer's checkpoint "
                                  f"{ours}; give the checkpoint directory itself (--projector {ours})")
        return None, read_reference_states(p), str(p)
    d = resolve_checkpoint(p)
    return warn_stage2(SignConfig.load(d), d), read_projector_file(d / PROJECTORS_NAME), str(d / PROJECTORS_NAME)


def own_checkpoint_of(path: Path) -> Path | None:
    """Our checkpoint directory whose DeepSpeed folder holds `path` (checkpoint-N/deepspeed/*.pt), if it is one."""
    for d in path.parents[:2]:
        if (d / CONFIG_NAME).is_file() and (d / PROJECTORS_NAME).is_file():
            return d
    return None


def warn_stage2(cfg: SignConfig | None, source: Path) -> SignConfig | None:
    """A stage-2 checkpoint as --projector gives its projectors and marker rows only; its LoRA is not carried on."""
    if cfg is not None and cfg.stage == 2:
        log.warning("--projector %s is a stage-2 checkpoint: this run starts from its projectors and marker rows "
                    "with a NEW LoRA adapter (its own adapter is not loaded); to continue that stage-2 run, run "
                    "finetune.py with its --output_dir and --resume", source)
    return cfg


def stage1_modalities(args, prev_cfg: SignConfig | None, state: dict) -> list[str] | None:
    """--modalities, else the stage-1 run's; a bare weights file names its modalities through its keys."""
    if args.modalities:
        return None                                   # load_data reads --modalities itself
    if prev_cfg is not None:
        return prev_cfg.modalities
    return sorted({k.split(".")[1] for k in state if k.startswith("projectors.")})


def lora_config(args) -> dict:
    targets = args.lora_targets if args.lora_targets == "all-linear" else [t.strip() for t in args.lora_targets.split(",")]
    return {"r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout, "target_modules": targets}


def train(args) -> int:
    env = setup_run(args)
    prev_cfg, state, source = read_projector_source(args.projector)
    log.info("stage-1 projectors from %s", source)
    if args.model:
        base, tok_path = args.model, args.model
    elif prev_cfg is not None:
        base, tok_path = prev_cfg.base_model, prev_cfg.tokenizer
    else:
        raise CheckpointError(f"{source}: carries no config.json naming its base model; pass --model")
    # Stage 1's template unless --chat_template names another: the markers' and projectors' context.
    template = resolve_template(args.chat_template) if args.chat_template else getattr(prev_cfg, "chat_template", None)
    tokenizer, added = load_tokenizer(tok_path, template)
    data = load_data(env, tokenizer, stage1_modalities(args, prev_cfg, state),
                     expected_dims=prev_cfg.dims if prev_cfg else None, base_model=base)
    cfg = model_config(env, data, stage=2, base_model=base, tokenizer_path=tok_path, added_tokens=added,
                       projector_types=prev_cfg.projector_types if prev_cfg else None, bits=args.bits,
                       lora=lora_config(args), chat_template=tokenizer.chat_template,
                       inherited_extraction=prev_cfg.extraction if prev_cfg else None,
                       # Stage 1's FeatureScale comes with its projectors (a bare weights file says so by its keys).
                       standardize_features=(prev_cfg.standardize_features if prev_cfg else
                                             any(".standardize." in k for k in state)))
    model = assemble(cfg, tokenizer, env.device, env.dtype, zero3=env.zero3, adapter="new",
                     gradient_checkpointing=args.gradient_checkpointing, label_smoothing=args.label_smoothing,
                     compile_layers=args.compile_layers,
                     activation_memory_budget=args.activation_memory_budget, fp8=args.fp8)
    # The original's checkpoints may lack the marker rows (frozen embeddings), and stage-1 runs of before
    # modality embeddings lack those: such rows start from their init (modality rows at zero change nothing).
    init = {k: v.detach().cpu() for k, v in model.projector_state().items() if k.startswith("marker_embed.")}
    lacking = sorted(set(init) - set(state))
    if lacking:
        log.warning("%s has no %s: they start from their init", source, ", ".join(lacking))
        state = {**state, **{k: init[k] for k in lacking}}
    model.load_projector_state(state, source)
    return fit(env, model, cfg, data)


def default_output_dir(projector: str) -> str:
    """`runs/x` or `runs/x/checkpoint-N` or `runs/x/checkpoint-N/projectors.safetensors` -> `runs/x-stage2`."""
    p = Path(projector).resolve()
    if p.is_file():
        p = p.parent
    if p.name.startswith("checkpoint-"):
        p = p.parent
    return str(p.with_name(p.name + "-stage2"))


def parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    p.add_argument("--projector", required=True, help="stage-1 output/checkpoint dir, projectors.safetensors, "
                                                      "or the original's mp_rank_00_model_states.pt")
    g = p.add_argument_group("QLoRA")
    g.add_argument("--bits", type=int, choices=[4, 16], default=4, help="4: nf4 + double quant base; 16: plain LoRA")
    g.add_argument("--lora_r", type=int, default=64, help="LoRA rank")
    g.add_argument("--lora_alpha", type=float, default=16, help="LoRA scale numerator (scale = alpha / r)")
    g.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA branch's input")
    g.add_argument("--lora_targets", default="all-linear",
                   help="'all-linear' (every linear layer of the LLM but lm_head: q,k,v,o,gate,up,down for Llama) "
                        "or a comma-separated list of module names")
    g.add_argument("--projector_lr", type=float,
                   help="learning rate of the projectors and marker rows (the original's mm_projector_lr; "
                        "default: --learning_rate); LoRA keeps --learning_rate")
    add_common_args(p, lr=2e-4, output_required=False,
                    output_help="default: beside the stage-1 run, '<its output dir>-stage2'")
    return p


def main(argv=None) -> int:
    p = parser()
    args = parse_args(p, argv)
    if not Path(args.projector).exists():          # before the distributed start-up, like validate_args' checks
        p.error(f"--projector {args.projector}: no such file or directory")
    if args.output_dir is None:
        args.output_dir = default_output_dir(args.projector)
    validate_args(p, args)
    return run_command(lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
