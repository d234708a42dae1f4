"""The embedded default LLM: a small random-init Llama and a byte-level BPE tokenizer with Llama-3's
special tokens and chat template, trained offline on the data's own sentences.

Used when no `--model` is given, so that the demo and the tests need no download. The pair is saved
once into `<output_dir>/base_model/` and later stages and generation load it from there.
"""
from __future__ import annotations

from pathlib import Path

import torch

from prompts import MARKER_TOKENS, SYSTEM_PROMPT, IS_REVERSED, MULTI_WORD, ONE_WORD, TRANSLATE, TRANSLATE_WITH_CONTEXT

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", *MARKER_TOKENS]

# The Llama-3 Instruct template (same rendering: BOS once, header, blank line, trimmed content, eot).
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")

# Sized to learn the demo language in minutes on two CPU cores (fp32).
DEFAULT_SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4, max_position_embeddings=4096)


def train_tokenizer(texts: list[str], vocab_size: int = 1000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    prompts = [SYSTEM_PROMPT, TRANSLATE, TRANSLATE_WITH_CONTEXT, ONE_WORD, MULTI_WORD, IS_REVERSED, "yes, no"]
    bpe.train_from_iterator(list(texts) + prompts * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  pad_token="<|finetune_right_pad_id|>")
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    return tok


def build_default_llm(out_dir: Path, texts: list[str], seed: int = 0, **shape) -> Path:
    """Train the tokenizer, build the random-init Llama, save both into out_dir. Deterministic in seed."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = train_tokenizer(texts)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **{**DEFAULT_SHAPE, **shape})
    torch.manual_seed(seed)
    llm = LlamaForCausalLM(cfg)
    llm.generation_config.eos_token_id = tok.eos_token_id
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tok.save_pretrained(tmp)
    llm.save_pretrained(tmp)
    tmp.rename(out_dir)          # complete or absent: a crash here never leaves half a base model
    return out_dir
