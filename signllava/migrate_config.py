"""The original Sign LLaVA's YAML configs in this trainer's flags.

    python -m signllava.migrate_config ORIGINAL.yaml > ours.yaml
    deepspeed finetune.py --config ours.yaml --output_dir runs/x     (the script the file's first line names)

The original's files have sections: ModelArguments, TrainingArguments, SignDataArguments, SignModelArguments,
SignMultiTaskArguments and SignMultiTaskEvalArguments for training; GenerateArguments and LoraArguments for
generation. Every key is translated to a flag, or dropped with the reason why, and what means something else
here is said; all of it is written as comments into the output, whose keys are the flags of the script the
file is for (pretrain.py for a stage-1 file, finetune.py when `lora_enable` is true, generate.py for a
generation file). `--config ORIGINAL.yaml` reads such a file directly the same way. A key this module does not
know is an error naming the closest key it does know: nothing is left out silently. A value of the wrong type
(a task that is a number, a weight in quotes, an empty label_smoothing_factor) is an error naming the key and
the type it needs.

Data paths are kept where the original put them: its `annotation_path` and each enabled modality's metadata
files become --annotation_file and --features (signllava/data_paths.py), relative to --data_dir as before.
"""
from __future__ import annotations

import difflib
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from signllava.data_paths import SPLIT_FIELD
from signllava.errors import brief
from signllava.layout import modality_rank

TRAINING_SECTIONS = ("ModelArguments", "TrainingArguments", "SignDataArguments", "SignModelArguments",
                     "SignMultiTaskArguments", "SignMultiTaskEvalArguments")
GENERATION_SECTIONS = ("GenerateArguments", "LoraArguments")
SECTIONS = TRAINING_SECTIONS + GENERATION_SECTIONS
TASK_NAMES = ("translation", "one_word_present", "multi_word_present", "is_reversed")
ORIGINAL_DEFAULTS = {"label_smoothing_factor": 0.1}       # the reference's TrainingArguments dataclass


class MigrationError(ValueError):
    """A file this module cannot translate faithfully; one line naming the file and key."""


# What a reader needs a value to be -> the Python types YAML reads it as. bool is an int in Python, so only
# "true or false" takes it.
KINDS = {"a mapping": (dict,), "a number": (int, float), "an integer": (int,), "true or false": (bool,),
         "a string": (str,)}
YAML_NAMES = {dict: "a mapping", list: "a list", str: "a string", bool: "true/false", int: "an integer",
              float: "a number", type(None): "null (an empty value)"}


def typed(source: str, key: str, value, kind: str, optional: bool = False):
    """`value`, the file's `key`, when it is `kind` (a key of KINDS; None too when `optional`). Every reader takes
    the values it works on through this, so a malformed one is a MigrationError naming the key and the kind it
    needs, not a crash inside the reader or a string iterated as if it were a mapping of its characters."""
    if value is None and optional:
        return None
    types = KINDS[kind]
    if isinstance(value, types) and (bool in types or not isinstance(value, bool)):
        return value
    shown = "" if value is None else f" {brief(value)}"
    raise MigrationError(f"{source}: {key} must be {kind}, got {YAML_NAMES.get(type(value), type(value).__name__)}"
                         f"{shown}")


def is_original_layout(data) -> bool:
    """A mapping whose top-level keys include the original's sections."""
    return isinstance(data, dict) and any(k in SECTIONS for k in data)


@dataclass
class Migration:
    """The flags a file translates to, where each came from, what was dropped and why, what differs."""
    source: str
    script: str
    values: dict = field(default_factory=dict)         # flag -> value, in the order set
    origins: dict = field(default_factory=dict)        # flag -> the original key(s) it came from
    dropped: list = field(default_factory=list)        # (original key, why)
    notes: list = field(default_factory=list)          # semantic differences

    def set(self, flag: str, value, origin: str):
        self.values[flag] = value
        self.origins[flag] = origin

    def drop(self, key: str, why: str):
        self.dropped.append((key, why))

    def note(self, text: str):
        self.notes.append(text)


# --------------------------------------------------------------------------------------------- simple keys
# (section, key) -> our flag, where the value carries over unchanged.
RENAMES = {
    ("ModelArguments", "model_name_or_path"): "model",
    ("TrainingArguments", "output_dir"): "output_dir",
    ("TrainingArguments", "per_device_train_batch_size"): "batch_size",
    ("TrainingArguments", "per_device_eval_batch_size"): "eval_batch_size",
    ("TrainingArguments", "gradient_accumulation_steps"): "grad_accum",
    ("TrainingArguments", "num_train_epochs"): "epochs",
    ("TrainingArguments", "save_total_limit"): "save_total_limit",
    ("TrainingArguments", "weight_decay"): "weight_decay",
    ("TrainingArguments", "warmup_ratio"): "warmup_ratio",
    ("TrainingArguments", "dataloader_num_workers"): "num_workers",
    ("TrainingArguments", "learning_rate"): "learning_rate",
    ("TrainingArguments", "gradient_checkpointing"): "gradient_checkpointing",
    ("TrainingArguments", "seed"): "seed",
    ("TrainingArguments", "max_grad_norm"): "max_grad_norm",
    ("TrainingArguments", "overwrite_output_dir"): "overwrite_output_dir",
    ("TrainingArguments", "eval_steps"): "eval_steps",
    ("TrainingArguments", "save_steps"): "save_steps",
    ("TrainingArguments", "logging_steps"): "logging_steps",
    ("TrainingArguments", "run_name"): "run_name",
    ("SignDataArguments", "data_dir"): "data_dir",
    ("SignDataArguments", "context_window_size"): "context_window",
    ("SignDataArguments", "prelude_window_size"): "prelude_window",
    ("GenerateArguments", "num_beams"): "num_beams",
    ("GenerateArguments", "max_new_tokens"): "max_new_tokens",
    ("GenerateArguments", "min_length"): "min_new_tokens",
    ("GenerateArguments", "seed"): "seed",
    ("GenerateArguments", "task"): "task",
}
STAGE2_RENAMES = {("TrainingArguments", k): k for k in ("lora_r", "lora_alpha", "lora_dropout")}
STAGE2_RENAMES[("TrainingArguments", "mm_projector_lr")] = "projector_lr"
TRAINING_ONLY = {("SignDataArguments", "use_paraphrases"): "use_paraphrases"}

PRECISION = "precision is automatic here: bf16 on a GPU, fp32 on a CPU"
NO_TRAINER = "no Hugging Face Trainer here; nothing to set"
FROM_CHECKPOINT = "the checkpoint's config.json says it (base model, tokenizer, template, LoRA, 4-bit base)"
# (section, key) -> why it has no flag here.
DROPS = {
    ("ModelArguments", "version"): "the prompt is laid out by the tokenizer's chat template (Llama 3's renders the "
                                   "original's llava_sign_llama_3 turns); --chat_template picks another",
    ("ModelArguments", "tune_mm_mlp_adapter"): "the projectors and the two marker rows always train, in both stages",
    ("ModelArguments", "freeze_embed_tokens"): "only the two marker rows of the embedding ever train (never the "
                                               "whole matrix), without weight decay, and they are always saved",
    ("ModelArguments", "freeze_mm_mlp_adapter"): "unused by the original (its loop froze one projector at most)",
    ("TrainingArguments", "bf16"): PRECISION,
    ("TrainingArguments", "fp16"): PRECISION,
    ("TrainingArguments", "tf32"): PRECISION,
    ("TrainingArguments", "do_train"): "both stages always train",
    ("TrainingArguments", "do_eval"): "the dev split is evaluated whenever it has an annotation file",
    ("TrainingArguments", "load_best_model_at_end"): "OUTPUT_DIR/best names the best checkpoint (rotation keeps it); "
                                                     "give O/best to generate.py or --projector; nothing is reloaded",
    ("TrainingArguments", "greater_is_better"): "follows --metric_for_best (dev_loss lower, bleu/chrf higher)",
    ("TrainingArguments", "double_quant"): "4-bit is always nf4 with double quantisation",
    ("TrainingArguments", "quant_type"): "4-bit is always nf4 with double quantisation",
    ("TrainingArguments", "lora_enable"): "it picks the script: true -> finetune.py (stage 2), false -> pretrain.py",
    ("TrainingArguments", "lora_bias"): "LoRA biases never train (the original's 'none')",
    ("TrainingArguments", "lora_weight_path"): "an adapter is not loaded from a file; a stage-2 run continues with "
                                               "--resume",
    ("TrainingArguments", "group_by_modality_length"): "it crashed in the original; here batches are grouped by "
                                                       "length by default (--no_group_by_length turns it off)",
    ("TrainingArguments", "data_seed"): "one --seed keys the batch plan and every sample's draws",
    ("TrainingArguments", "optimizers"): "AdamW always (decay on weight matrices only)",
    ("TrainingArguments", "optim"): "AdamW always (decay on weight matrices only)",
    ("TrainingArguments", "adam_beta1"): "AdamW's betas are 0.9, 0.999 and eps 1e-8",
    ("TrainingArguments", "adam_beta2"): "AdamW's betas are 0.9, 0.999 and eps 1e-8",
    ("TrainingArguments", "adam_epsilon"): "AdamW's betas are 0.9, 0.999 and eps 1e-8",
    ("TrainingArguments", "logging_dir"): "TensorBoard events go to OUTPUT_DIR/runs",
    ("TrainingArguments", "deepspeed"): "the original's JSONs hold Trainer 'auto' values DeepSpeed cannot read; "
                                        "--deepspeed_config ds_config_zero2.json (the default) or ds_config_zero3.json",
    ("TrainingArguments", "remove_unused_columns"): NO_TRAINER,
    ("TrainingArguments", "ddp_find_unused_parameters"): NO_TRAINER,
    ("TrainingArguments", "dataloader_pin_memory"): "pinned on a GPU, not on a CPU",
    ("GenerateArguments", "model_base"): FROM_CHECKPOINT,
    ("GenerateArguments", "conv_mode"): FROM_CHECKPOINT,
    ("GenerateArguments", "top_p"): "beam search without sampling",
    ("GenerateArguments", "temperature"): "beam search without sampling",
    ("GenerateArguments", "skip_special_tokens"): "hypotheses are always decoded without special tokens",
    ("GenerateArguments", "remove_invalid_values"): "features are checked to be finite when read",
    ("GenerateArguments", "do_verbose"): "the progress bar and the log say what is done",
    ("GenerateArguments", "bf16"): PRECISION,
}
STRATEGIES = ("evaluation_strategy", "eval_strategy", "save_strategy", "logging_strategy")
# Dropped keys whose other values mean something this trainer does not do: said in the notes too.
SAME_AS_HERE = {"double_quant": (True,), "quant_type": ("nf4",), "lora_bias": ("none",), "lora_weight_path": ("", None),
                "tune_mm_mlp_adapter": (True,), "optimizers": ("adamw_torch", "adamw_hf", "adamw_torch_fused"),
                "optim": ("adamw_torch", "adamw_hf", "adamw_torch_fused"), "adam_beta1": (0.9,),
                "adam_beta2": (0.999,), "adam_epsilon": (1e-8,)}


def known_keys() -> dict[str, list[str]]:
    """Section -> the keys this module translates or drops (for the closest-key hint)."""
    out: dict[str, list[str]] = {s: [] for s in SECTIONS}
    for section, key in (*RENAMES, *STAGE2_RENAMES, *TRAINING_ONLY, *DROPS):
        out[section].append(key)
    out["TrainingArguments"] += [*STRATEGIES, "model_max_length", "auto_find_batch_size", "resume_from_checkpoint",
                                 "metric_for_best_model", "label_smoothing_factor", "lr_scheduler_type", "bits",
                                 "max_steps", "warmup_steps", "report_to"]
    out["SignDataArguments"] += ["annotation_path", "visual_features", "prepared_predicted_context",
                                 "on_the_fly_predicted_context"]
    out["SignModelArguments"] += ["projectors"]
    out["SignMultiTaskArguments"] += list(TASK_NAMES)
    out["SignMultiTaskEvalArguments"] += list(TASK_NAMES)
    out["GenerateArguments"] += ["model_path", "checkpoint_num", "generate_des", "num_datapoints", "do_sample"]
    out["LoraArguments"] += ["bits", "double_quant", "quant_type", "lora_enable", "lora_r", "lora_alpha",
                             "lora_dropout", "lora_weight_path", "lora_bias"]
    return out


# The original's names for what a flat --config file might hold, beyond the plain renames.
NESTED_HINTS = {"annotation_path": "annotation_file", "visual_features": "modalities and features",
                "pretrained_projector_ckpt": "projector", "projectors": "projector_type",
                "model_max_length": "max_seq_len", "metric_for_best_model": "metric_for_best",
                "label_smoothing_factor": "label_smoothing", "lr_scheduler_type": "lr_scheduler",
                "mm_projector_lr": "projector_lr", "resume_from_checkpoint": "resume",
                "sample_weight": "task_weights", **{t: "task_weights" for t in TASK_NAMES}}


def original_key_hint(key: str) -> str | None:
    """The flag an original key (possibly `Section.key` or dotted, as a flattened file has it) corresponds to."""
    parts = [p for p in str(key).split(".") if p not in SECTIONS]
    for part in parts:
        for (_, original), flag in {**RENAMES, **STAGE2_RENAMES, **TRAINING_ONLY}.items():
            if part == original:
                return flag
        if part in NESTED_HINTS:
            return NESTED_HINTS[part]
    return None


# --------------------------------------------------------------------------------------------- the file
def migrate(data: dict, source: str) -> Migration:
    """Translate an original config (already parsed) into flags. Raises MigrationError."""
    if not is_original_layout(data):
        raise MigrationError(f"{source}: not the original Sign LLaVA's layout (no section of {', '.join(SECTIONS)})")
    unknown_sections = [k for k in data if k not in SECTIONS]
    if unknown_sections:
        raise MigrationError(f"{source}: unknown section(s) {', '.join(map(str, unknown_sections))}"
                             + _closest(str(unknown_sections[0]), SECTIONS))
    sections = {name: dict(typed(source, f"section {name}", body, "a mapping", optional=True) or {})
                for name, body in data.items()}
    generation = "GenerateArguments" in sections
    if generation and any(s in sections for s in TRAINING_SECTIONS[:2]):
        raise MigrationError(f"{source}: holds both GenerateArguments and training sections; convert one at a time")
    ta = sections.get("TrainingArguments", {})
    stage2 = bool(typed(source, "TrainingArguments.lora_enable", ta.get("lora_enable"), "true or false", optional=True))
    m = Migration(source, "generate.py" if generation else "finetune.py" if stage2 else "pretrain.py")
    _check_unknown(sections, source)
    if generation:
        _generation(sections, m)
    else:
        _training(sections, m, stage2)
    return m


def _check_unknown(sections: dict, source: str):
    known = known_keys()
    problems = []
    for name, body in sections.items():
        for key in body:
            if key not in known[name]:
                problems.append(f"{name}.{key}{_closest(str(key), known[name])}")
    if problems:
        raise MigrationError(f"{source}: key(s) this converter does not know: {'; '.join(problems)} "
                             "(nothing is left out silently: remove them, or ask for their translation)")


def _closest(word: str, options) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (closest: {match[0]})" if match else ""


def _simple(sections: dict, m: Migration, table: dict, consumed: set):
    for (section, key), flag in table.items():
        if key in sections.get(section, {}):
            value = sections[section][key]
            if value is not None:
                m.set(flag, value, f"{section}.{key}")
            consumed.add((section, key))


def _drops(sections: dict, m: Migration, consumed: set):
    for (section, key), why in DROPS.items():
        if key in sections.get(section, {}) and (section, key) not in consumed:
            value = sections[section][key]
            m.drop(f"{section}.{key}: {value!r}", why)
            if key in SAME_AS_HERE and value not in SAME_AS_HERE[key]:
                m.note(f"{section}.{key} is {value!r} in the original; here: {why}")
            consumed.add((section, key))


# --------------------------------------------------------------------------------------------- training
def _training(sections: dict, m: Migration, stage2: bool):
    consumed: set = set()
    ta = sections.get("TrainingArguments", {})
    _simple(sections, m, {**RENAMES, **TRAINING_ONLY, **(STAGE2_RENAMES if stage2 else {})}, consumed)
    if not stage2:
        for key in ("lora_r", "lora_alpha", "lora_dropout"):
            if key in ta:
                m.drop(f"TrainingArguments.{key}: {ta[key]!r}", "stage 1 has no LoRA")
        if ta.get("mm_projector_lr") is not None:        # stage 1 trains projectors (and marker rows) only
            m.drop(f"TrainingArguments.learning_rate: {ta.get('learning_rate')!r}", "the original's rate of the "
                   "embedding matrix, which does not train here")
            m.set("learning_rate", ta["mm_projector_lr"], "TrainingArguments.mm_projector_lr")
            m.note("mm_projector_lr became --learning_rate: stage 1 trains only projectors and the marker rows; the "
                   "original's learning_rate applied to its embedding matrix, which does not train here")
    _training_arguments(ta, m, stage2)
    _drops(sections, m, consumed)
    data = sections.get("SignDataArguments", {})
    _annotation(data.get("annotation_path"), m, ("train", "dev"))
    _visual_features(data.get("visual_features") or {}, m, ("train", "dev"))
    for key in ("prepared_predicted_context", "on_the_fly_predicted_context"):
        if key in data:
            m.drop(f"SignDataArguments.{key}: {data[key]!r}", "generation's context mode; training context is gold")
    _projectors(sections.get("SignModelArguments", {}).get("projectors") or {}, m, stage2, generation=False)
    _tasks(sections.get("SignMultiTaskArguments"), m, "task_weights", "SignMultiTaskArguments")
    _tasks(sections.get("SignMultiTaskEvalArguments"), m, "eval_task_weights", "SignMultiTaskEvalArguments")
    m.note("checkpoints hold only what trains (projectors, marker rows, LoRA) as projectors.safetensors and "
           "adapter/, not the original's mp_rank_00_model_states.pt; finetune.py --projector still reads that file")


def _training_arguments(ta: dict, m: Migration, stage2: bool):
    """The TrainingArguments keys whose translation is more than a rename."""
    for key in STRATEGIES:
        if key in ta:
            value = ta[key]
            m.drop(f"TrainingArguments.{key}: {value!r}", "evaluation, saving and logging go by steps")
            if value not in ("steps", None):
                m.note(f"{key}: {value!r} in the original; here every --eval_steps / --save_steps / --logging_steps "
                       "steps: set them to an epoch's steps for the same")
    if ta.get("max_steps") not in (None, -1, 0):
        m.set("max_steps", ta["max_steps"], "TrainingArguments.max_steps")
    elif "max_steps" in ta:
        m.drop(f"TrainingArguments.max_steps: {ta['max_steps']!r}", "off: --epochs decides")
    if ta.get("warmup_steps"):
        m.drop(f"TrainingArguments.warmup_steps: {ta['warmup_steps']!r}", "the warmup is a share of the steps")
        m.note("warmup_steps has no equivalent: give --warmup_ratio (the steps' share) instead")
    elif "warmup_steps" in ta:
        m.drop("TrainingArguments.warmup_steps: 0", "no warmup steps given")
    _best_metric(ta, m)
    _smoothing(ta, m)
    _scheduler(ta, m)
    _trackers(ta, m)
    _sequence_length(ta, m)
    _batch_search(ta, m)
    _resume(ta, m)
    _bits(ta, m, stage2)
    if "output_dir" in ta:
        m.note("output_dir is taken as it is: the original appended -$SLURM_JOB_ID to it under SLURM; here a run "
               "refuses a folder that holds checkpoints unless --resume or --overwrite_output_dir")


def _best_metric(ta: dict, m: Migration):
    if "metric_for_best_model" not in ta:
        return
    value = ta["metric_for_best_model"]
    if value in ("eval_loss", "loss"):
        m.set("metric_for_best", "dev_loss", "TrainingArguments.metric_for_best_model")
        m.note("best checkpoint by dev loss, as the original's metric_for_best_model eval_loss; this trainer's own "
               "default is dev BLEU (it translates the dev split at each evaluation): delete metric_for_best for that")
    else:
        m.drop(f"TrainingArguments.metric_for_best_model: {value!r}", "no such metric here (dev_loss, bleu, chrf)")
        m.note(f"metric_for_best_model {value!r} has no equivalent; the best checkpoint is picked by dev BLEU")


def _smoothing(ta: dict, m: Migration):
    if "label_smoothing_factor" in ta:
        # An empty value is not the original's default: it set the YAML's values as they are (setattr after the
        # dataclass, reference §5.1), so its Trainer got None.
        key = "TrainingArguments.label_smoothing_factor"
        m.set("label_smoothing", typed(m.source, key, ta["label_smoothing_factor"], "a number"), key)
    else:
        m.set("label_smoothing", ORIGINAL_DEFAULTS["label_smoothing_factor"], "the original's default (unset)")
        m.note("label_smoothing 0.1: unset in the file, so the original's dataclass default (0.1) applied there; "
               "this trainer's default is 0")
    if m.values["label_smoothing"]:
        m.note("label smoothing is applied to each answer token here; the original's was misaligned in batches of "
               "more than one clip (its targets shifted by the visual block's length)")


SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}


def _scheduler(ta: dict, m: Migration):
    if "lr_scheduler_type" not in ta:
        m.note("lr_scheduler_type unset: the original's default was linear; this trainer's is cosine")
        m.set("lr_scheduler", "linear", "the original's default (unset)")
        return
    value = typed(m.source, "TrainingArguments.lr_scheduler_type", ta["lr_scheduler_type"], "a string")
    if value in SCHEDULES:
        m.set("lr_scheduler", SCHEDULES[value], "TrainingArguments.lr_scheduler_type")
    else:
        m.drop(f"TrainingArguments.lr_scheduler_type: {value!r}", "only cosine, linear and constant here")
        m.note(f"lr_scheduler_type {value!r} has no equivalent; cosine is used")


def _trackers(ta: dict, m: Migration):
    """The Trainer's report_to (a name, a list, "none" or "all") -> --report_to, keeping the trackers this
    trainer has (signllava/trackers.py); the others are dropped and said."""
    from signllava.trackers import TRACKERS
    if "report_to" not in ta:
        return
    value = ta["report_to"]
    names = [str(n).strip().lower() for n in (value if isinstance(value, list) else str(value).split(","))]
    names = list(TRACKERS) if names == ["all"] else [n for n in names if n]
    kept = [n for n in names if n in TRACKERS]
    others = [n for n in names if n not in TRACKERS and n != "none"]
    if others:
        m.drop(f"TrainingArguments.report_to: {', '.join(others)}", f"the trackers here are {', '.join(TRACKERS)}")
    m.set("report_to", ",".join(kept) or "none", "TrainingArguments.report_to")


def _sequence_length(ta: dict, m: Migration):
    if ta.get("model_max_length"):
        m.set("max_seq_len", ta["model_max_length"], "TrainingArguments.model_max_length")
        m.note(f"max_seq_len {ta['model_max_length']}: the original cut the spliced sequence at model_max_length "
               "from the right, losing the answer first; here a longer clip has its frames capped to fit "
               "(--long_samples cap, counted in the log) and its text is never cut")
    else:
        m.note("model_max_length unset: the original truncated every spliced sequence at 512 tokens (its default), "
               "answers first; here nothing is cut (the LLM's maximum positions bound the frames)")


def _batch_search(ta: dict, m: Migration):
    if "auto_find_batch_size" in ta:
        m.drop(f"TrainingArguments.auto_find_batch_size: {ta['auto_find_batch_size']!r}",
               "no batch-size search: the batch is --batch_size, or cut by tokens with --max_tokens_per_batch")
        if ta["auto_find_batch_size"] and "per_device_train_batch_size" not in ta:
            m.note("auto_find_batch_size: the original searched for a batch that fits (and so changed the effective "
                   "batch mid-run); here the batch is --batch_size (default 8): choose it, or --max_tokens_per_batch")


def _resume(ta: dict, m: Migration):
    if "resume_from_checkpoint" not in ta:
        return
    value = ta["resume_from_checkpoint"]
    if value is True:
        m.set("resume", True, "TrainingArguments.resume_from_checkpoint")
    elif value in (False, None):
        m.drop(f"TrainingArguments.resume_from_checkpoint: {value!r}", "off (the default)")
    else:
        m.drop(f"TrainingArguments.resume_from_checkpoint: {value!r}", "--resume continues OUTPUT_DIR's latest "
                                                                      "complete checkpoint; a path is not taken")
        m.note("resume_from_checkpoint named a path: give that run's folder as --output_dir with --resume")


def _bits(ta: dict, m: Migration, stage2: bool):
    if "bits" not in ta:
        return
    value = ta["bits"]
    if stage2 and value in (4, 16):
        m.set("bits", value, "TrainingArguments.bits")
    elif stage2:
        m.drop(f"TrainingArguments.bits: {value!r}", "only 4 (nf4) or 16")
        m.note(f"bits {value!r} has no equivalent; finetune.py's default 4-bit base is used")
    else:
        m.drop(f"TrainingArguments.bits: {value!r}", "stage 1's frozen LLM is never quantised")
        if value != 16:
            m.note(f"bits {value!r} in a stage-1 file: the LLM is loaded in full precision here")


# --------------------------------------------------------------------------------------------- data
def one_path_spec(by_split: dict[str, str]) -> str | None:
    """One path for every split (equal paths, or one with {split} that gives each), or None."""
    paths = list(dict.fromkeys(by_split.values()))
    if len(paths) == 1:
        return paths[0]
    split0, path0 = next(iter(by_split.items()))
    start = path0.find(split0)
    while start >= 0:
        template = path0[:start] + SPLIT_FIELD + path0[start + len(split0):]
        if all(template.replace(SPLIT_FIELD, s) == p for s, p in by_split.items()):
            return template
        start = path0.find(split0, start + 1)
    return None


def _annotation(value, m: Migration, splits: tuple[str, ...]):
    origin = "SignDataArguments.annotation_path"
    if value is None:
        return
    if isinstance(value, str):
        by_split = {s: value for s in splits}
        if not Path(value).is_absolute():
            m.note("annotation_path is relative: the original's generation script read it from the working "
                   "directory, here it is under data_dir")
    elif isinstance(value, dict):
        by_split = {s: typed(m.source, f"{origin}.{s}", value[s], "a string") for s in splits if s in value}
        for s in value:
            if s not in splits:
                m.drop(f"{origin}.{s}: {value[s]!r}", f"{m.script} reads only the {'/'.join(splits)} split(s)")
        if not by_split:
            return
    else:
        raise MigrationError(f"{m.source}: {origin} must be a path or a mapping split -> path")
    spec = one_path_spec(by_split)
    if spec == f"annotation.{SPLIT_FIELD}.json":
        m.drop(f"{origin}: {value!r}", "today's layout (DATA_DIR/annotation.<split>.json) is the default")
        return
    m.set("annotation_file", spec or ",".join(f"{s}={p}" for s, p in by_split.items()), origin)


def _visual_features(vf: dict, m: Migration, splits: tuple[str, ...]):
    """enable_input -> modalities; each enabled modality's metadata paths -> features (unless today's layout)."""
    origin = "SignDataArguments.visual_features"
    enabled, specs = [], []
    for modality, spec in typed(m.source, origin, vf, "a mapping").items():
        key = f"{origin}.{modality}"
        spec = typed(m.source, key, spec, "a mapping", optional=True) or {}
        unknown = [k for k in spec if k not in ("enable_input", "train", "dev", "test")]
        if unknown:
            raise MigrationError(f"{m.source}: {key}: unknown key(s) {', '.join(map(str, unknown))}"
                                 + _closest(str(unknown[0]), ("enable_input", "train", "dev", "test")))
        if not typed(m.source, f"{key}.enable_input", spec.get("enable_input"), "true or false", optional=True):
            m.drop(key, "modality disabled (enable_input false): not read")
            continue
        paths = {s: typed(m.source, f"{key}.{s}", spec[s], "a string") for s in splits if spec.get(s)}
        lacking = [s for s in splits if s not in paths]
        if lacking:          # the original loads a training modality only with both its train and dev paths
            m.drop(f"{origin}.{modality}", f"enabled but without a {'/'.join(lacking)} path, so the original never "
                                           "read it; left out here too")
            m.note(f"modality {modality} was enabled without a {'/'.join(lacking)} path: the original silently "
                   "left it out, and so does this file (add the path and the modality to use it)")
            continue
        for s in spec:
            if s in ("train", "dev", "test") and s not in splits:
                m.drop(f"{origin}.{modality}.{s}", f"{m.script} reads only the {'/'.join(splits)} split(s)")
        enabled.append(modality)
        one = one_path_spec(paths)
        if one == f"{modality}/metadata_{modality}.{SPLIT_FIELD}.json":
            continue                                     # today's layout finds it by itself
        specs += [f"{modality}={one}"] if one else [f"{modality}.{s}={p}" for s, p in paths.items()]
    if not enabled:
        raise MigrationError(f"{m.source}: {origin}: no modality is enabled (enable_input: true) with paths for "
                             f"{'/'.join(splits)}")
    m.set("modalities", ",".join(sorted(enabled, key=modality_rank)), f"{origin}.<m>.enable_input")
    if specs:
        m.set("features", ",".join(specs), " + ".join(f"{origin}.<m>.{s}" for s in splits))


def _projectors(projectors: dict, m: Migration, stage2: bool, generation: bool):
    origin = "SignModelArguments.projectors"
    enabled = (m.values.get("modalities") or "").split(",")
    types = {}
    for modality, spec in typed(m.source, origin, projectors, "a mapping").items():
        if modality == "pretrained_projector_ckpt":
            _stage1_weights(spec, m, stage2, generation)
            continue
        spec = typed(m.source, f"{origin}.{modality}", spec, "a mapping", optional=True) or {}
        if "dim" in spec:
            m.drop(f"{origin}.{modality}.dim: {spec['dim']!r}", "feature dims are read from the data (and checked "
                                                                "against a stage-1 checkpoint)")
        if "projector_type" in spec:
            if generation:
                m.drop(f"{origin}.{modality}.projector_type", "the checkpoint's config.json has the projector types "
                                                              "(the original loaded nothing when this differed)")
            elif modality in enabled:
                types[modality] = typed(m.source, f"{origin}.{modality}.projector_type", spec["projector_type"],
                                        "a string")
            else:
                m.drop(f"{origin}.{modality}.projector_type", "modality disabled")
    if types:
        ordered = [types[mod] for mod in sorted(types, key=modality_rank)]
        common = Counter(ordered).most_common(1)[0][0]        # a tie: the type of the first in splice order
        rest = [f"{mod}={t}" for mod, t in types.items() if t != common]
        m.set("projector_type", ",".join([common, *rest]), f"{origin}.<m>.projector_type")
        if stage2:
            m.note("projector_type in a stage-2 file matters only for the original's .pt as --projector: a stage-1 "
                   "run of this trainer brings its own projector types")


def _stage1_weights(path, m: Migration, stage2: bool, generation: bool):
    key = "SignModelArguments.projectors.pretrained_projector_ckpt"
    if stage2:
        m.set("projector", typed(m.source, key, path, "a string"), key)
        m.note("projector: the original's mp_rank_00_model_states.pt is read as it is (projectors and the last two "
               "embedding rows); a stage-1 run of this trainer is given as its output folder")
    elif generation:
        m.drop(f"{key}: {path!r}", FROM_CHECKPOINT)
    else:
        m.drop(f"{key}: {path!r}", "stage 1 starts from fresh projectors; finetune.py --projector takes earlier "
                                   "ones, and --resume continues a stage-1 run")
        m.note("pretrained_projector_ckpt in a stage-1 file (the original continued from it): not loaded here; "
               "continue that run with --resume in its own output folder")


def _tasks(body, m: Migration, flag: str, section: str):
    """sample_weight (with the s2v branches' enable) -> task weights; max_num_words (_max_num_words)."""
    if body is None:
        return
    weights = {}
    for task, spec in body.items():
        key = f"{section}.{task}"
        spec = typed(m.source, key, spec, "a mapping", optional=True) or {}
        unknown = [k for k in spec if k not in ("sample_weight", "enable", "max_num_words")]
        if unknown:
            raise MigrationError(f"{m.source}: {key}: unknown key(s) {', '.join(map(str, unknown))}"
                                 + _closest(str(unknown[0]), ("sample_weight", "enable", "max_num_words")))
        if typed(m.source, f"{key}.enable", spec.get("enable", True), "true or false") is False:
            m.drop(key, "enable: false")
        elif typed(m.source, f"{key}.sample_weight", spec.get("sample_weight", 0), "a number"):
            weights[task] = spec["sample_weight"]
        if "max_num_words" in spec:
            _max_num_words(spec["max_num_words"], m, section, task)
    if not weights:
        raise MigrationError(f"{m.source}: {section}: no task has a positive sample_weight")
    m.set(flag, ",".join(f"{t}={w:g}" for t, w in weights.items()),
          f"{section}.<task>.sample_weight + {section}.<task>.enable")
    if flag == "eval_task_weights" and set(weights) != {"translation"}:
        m.note("dev tasks: the original drew a task at every fetch (a stochastic dev loss); here each dev clip's "
               "task is fixed by (seed, clip)")


def _max_num_words(value, m: Migration, section: str, task: str):
    """The training tasks' multi_word_present.max_num_words -> --max_num_words. The original read it there alone
    (reference §4, §6.1: from the training section, for the task that asks several words); elsewhere it is dropped."""
    key = f"{section}.{task}.max_num_words"
    if section == "SignMultiTaskArguments" and task == "multi_word_present":
        m.set("max_num_words", typed(m.source, key, value, "an integer"), key)
    elif task != "multi_word_present":
        m.drop(f"{key}: {value!r}", "only multi_word_present asks several words; the original read max_num_words "
                                    "from there alone")
    else:
        m.drop(f"{key}: {value!r}", "one max_num_words, from the training tasks (as the original read it)")


# --------------------------------------------------------------------------------------------- generation
def _generation(sections: dict, m: Migration):
    consumed: set = set()
    gen = sections["GenerateArguments"]
    _simple(sections, m, RENAMES, consumed)
    _drops(sections, m, consumed)
    for key, value in sections.get("LoraArguments", {}).items():
        m.drop(f"LoraArguments.{key}: {value!r}", FROM_CHECKPOINT)
    if "model_path" in gen:
        path = typed(m.source, "GenerateArguments.model_path", gen["model_path"], "a string")
        step = typed(m.source, "GenerateArguments.checkpoint_num", gen.get("checkpoint_num"), "an integer", True)
        ckpt = str(Path(path) / f"checkpoint-{step}") if step else path
        m.set("checkpoint", ckpt, "GenerateArguments.model_path + GenerateArguments.checkpoint_num")
        m.note("checkpoint: a run of this trainer (the original's checkpoints do not load here; its stage-1 "
               "projectors go into finetune.py --projector)")
    if typed(m.source, "GenerateArguments.generate_des", gen.get("generate_des"), "a string", optional=True):
        m.set("output", str(Path(gen.get("model_path") or ".") / gen["generate_des"]), "GenerateArguments.generate_des")
    if "num_datapoints" in gen:
        n = typed(m.source, "GenerateArguments.num_datapoints", gen["num_datapoints"], "an integer", optional=True)
        m.set("limit", 0 if n is None or n < 0 else n, "GenerateArguments.num_datapoints")
    if typed(m.source, "GenerateArguments.do_sample", gen.get("do_sample"), "true or false", optional=True):
        m.note("do_sample: true has no equivalent; generation is beam search (--num_beams)")
    if "do_sample" in gen:
        m.drop(f"GenerateArguments.do_sample: {gen['do_sample']!r}", "beam search without sampling")
    m.set("split", "test", "SignDataArguments.visual_features.<m>.test")
    data = sections.get("SignDataArguments", {})
    _annotation(data.get("annotation_path"), m, ("test",))
    _visual_features(data.get("visual_features") or {}, m, ("test",))
    _context_mode(data, m)
    if "use_paraphrases" in data:
        m.drop(f"SignDataArguments.use_paraphrases: {data['use_paraphrases']!r}", "generation never uses them")
    _projectors(sections.get("SignModelArguments", {}).get("projectors") or {}, m, False, generation=True)
    if sections.get("SignMultiTaskArguments"):
        for task, spec in sections["SignMultiTaskArguments"].items():
            m.drop(f"SignMultiTaskArguments.{task}", "the task is --task; max_num_words is 5")


def _context_mode(data: dict, m: Migration):
    """The original's gold / prepared / on-the-fly context -> --context gold | FILE | predicted."""
    prepared, on_the_fly = (typed(m.source, f"SignDataArguments.{k}", data.get(k), "true or false", optional=True)
                            for k in ("prepared_predicted_context", "on_the_fly_predicted_context"))
    if prepared:
        if not m.values.get("annotation_file"):
            raise MigrationError(f"{m.source}: prepared_predicted_context needs annotation_path (the earlier output)")
        data_dir = typed(m.source, "SignDataArguments.data_dir", m.values.get("data_dir", "."), "a string")
        m.set("context", str(Path(data_dir) / m.values["annotation_file"]),
              "SignDataArguments.prepared_predicted_context + SignDataArguments.annotation_path")
    elif on_the_fly:
        m.set("context", "predicted", "SignDataArguments.on_the_fly_predicted_context")
    elif not m.values.get("context_window") and not m.values.get("prelude_window"):
        m.set("context", "none", "SignDataArguments.context_window_size + SignDataArguments.prelude_window_size")
    else:
        m.set("context", "gold", "SignDataArguments.prepared_predicted_context + "
                                 "SignDataArguments.on_the_fly_predicted_context")
        m.note("context gold, as the original's default; generate.py's own default is the model's predicted "
               "context (or none for a checkpoint trained without a window): gold does not exist at test time")
    for key in ("prepared_predicted_context", "on_the_fly_predicted_context"):
        if key in data:
            m.drop(f"SignDataArguments.{key}: {data[key]!r}", "it became --context")


# --------------------------------------------------------------------------------------------- output
def render(m: Migration) -> str:
    """The --config file: comments saying how to run it, what differs and what was dropped; then flag: value
    lines, each naming the original key it came from."""
    lines = [f"# {m.script} --config THIS_FILE: converted by `python -m signllava.migrate_config {m.source}`",
             "# from the original Sign LLaVA's layout. Flags on the command line override these values.", "#"]
    if m.notes:
        lines.append("# What means something else here:")
        lines += [f"#   - {n}" for n in m.notes]
    if m.dropped:
        lines.append("# Dropped (no flag here), and why:")
        lines += [f"#   - {k}: {why}" for k, why in m.dropped]
    for flag, value in m.values.items():
        text = yaml.safe_dump({flag: value}, default_flow_style=False, width=10**6).strip()
        lines.append(f"{text}    # <- {m.origins[flag]}")
    return "\n".join(lines) + "\n"


def read_original(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise MigrationError(f"{path}: cannot read it ({str(e).splitlines()[0]})") from None
    return data


def main(argv=None) -> int:
    from signllava.cli import make_parser
    p = make_parser(__doc__, prog="python -m signllava.migrate_config", positional="ORIGINAL.yaml")
    p.add_argument("config", metavar="ORIGINAL.yaml", help="a config file of the original Sign LLaVA")
    args = p.parse_args(argv)
    try:
        m = migrate(read_original(Path(args.config)), args.config)
    except MigrationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(render(m))
    print(f"{args.config}: {len(m.values)} flags for {m.script}, {len(m.dropped)} keys dropped, "
          f"{len(m.notes)} differences noted (all in the output's comments)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
