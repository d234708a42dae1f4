"""The prompt layout under chat templates of every family: exact input ids, labels, end-of-turn (stop) token
and generation prompt for Llama 3 with a date, a Gemma-style template without a system role, a tokenizer
with no template (the built-in one), ChatML; and template faults as one-line errors naming the model."""
from pathlib import Path

import pytest

from model import load_tokenizer
from signllava.demo import LLAMA3_CHAT_TEMPLATE, train_tokenizer
from signllava.errors import CheckpointError
from signllava.prompts import (BUILTIN_TEMPLATE, SYSTEM_PROMPT, TRANSLATE, PromptBuilder, chat_layout, resolve_template,
                               setup_special_tokens, special_ids)
from tests.kit import WORDS

# Gemma 2's own template: no system role, 'model' for the assistant, <end_of_turn> closes a turn (not <eos>).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")
# Llama 3.1/3.2 print today's date into the system turn (date_string, else strftime_now).
LLAMA31_DATE = ("{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
                "Today Date: {{ date_string }} / {{ strftime_now('%Y-%m-%d') }}|")
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def base_tok():
    return train_tokenizer([" ".join(WORDS)] * 5, vocab_size=400)


def fresh(base_tok, template, extra_special=()):
    tok = base_tok.__class__(tokenizer_object=base_tok.backend_tokenizer.__class__.from_str(base_tok.backend_tokenizer.to_str()),
                             bos_token=base_tok.bos_token, eos_token=base_tok.eos_token, pad_token=base_tok.pad_token)
    if extra_special:
        tok.add_special_tokens({"additional_special_tokens": list(extra_special)}, replace_extra_special_tokens=False)
    tok.chat_template = template
    setup_special_tokens(tok)
    return tok


def layout(tok, answer="the cat runs"):
    ids = special_ids(tok)
    b = PromptBuilder(tok, ids["markers"], ids["pad"])
    start, end = ids["markers"]
    frames = [start, ids["pad"], ids["pad"], end]
    got, labels, _ = b.build([2], TRANSLATE, answer)
    gen, gen_labels, _ = b.build([2], TRANSLATE, None)
    assert set(gen_labels.tolist()) == {-100}
    return ids, frames, got.tolist(), labels.tolist(), gen.tolist()


def check(tok, before: str, after: str, answer_text: str, eot_token: str):
    """Generation prompt = enc(before) + frames + enc(after); the answer adds enc(answer_text) + [eot], all labelled."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    ids, frames, got, labels, gen = layout(tok)
    eot = tok.convert_tokens_to_ids(eot_token)
    assert ids["eot"] == eot
    prompt = enc(before) + frames + enc(after)
    answer = enc(answer_text) + [eot]
    assert gen == prompt
    assert got == prompt + answer
    assert labels == [-100] * len(prompt) + answer


def test_llama3_layout_with_a_fixed_date(base_tok):
    tok = fresh(base_tok, LLAMA3_CHAT_TEMPLATE.replace("{{- bos_token }}", "{{- bos_token }}" + LLAMA31_DATE))
    head = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"
    check(tok, "<|begin_of_text|>Today Date: 26 Jul 2024 / 2024-07-26|" + head("system") + SYSTEM_PROMPT
          + "<|eot_id|>" + head("user"), "\n" + TRANSLATE + "<|eot_id|>" + head("assistant"), "the cat runs", "<|eot_id|>")


def test_gemma_template_folds_the_system_prompt_and_stops_at_end_of_turn(base_tok):
    tok = fresh(base_tok, GEMMA_TEMPLATE, ["<start_of_turn>", "<end_of_turn>"])
    assert chat_layout(tok).fold_system
    check(tok, "<|begin_of_text|><start_of_turn>user\n" + SYSTEM_PROMPT + "\n\n",
          "\n" + TRANSLATE + "<end_of_turn>\n<start_of_turn>model\n", "the cat runs", "<end_of_turn>")
    assert special_ids(tok)["eot"] != tok.eos_token_id


def test_chatml_trains_no_newline_after_im_end(base_tok):
    tok = fresh(base_tok, CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"])
    assert not chat_layout(tok).fold_system
    check(tok, "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n",
          "\n" + TRANSLATE + "<|im_end|>\n<|im_start|>assistant\n", "the cat runs", "<|im_end|>")


def test_tokenizer_without_template_gets_the_builtin_one(base_tok, tmp_path):
    fresh(base_tok, None).save_pretrained(tmp_path / "base")
    tok, _ = load_tokenizer(str(tmp_path / "base"))
    assert tok.chat_template == BUILTIN_TEMPLATE
    eos = tok.eos_token
    check(tok, f"<|begin_of_text|>System: {SYSTEM_PROMPT}{eos}\nUser: ", f"\n{TRANSLATE}{eos}\nAssistant:",
          " the cat runs", eos)
    # the same template chosen by flag for a model that has its own, and one read from a file
    assert resolve_template("builtin") == BUILTIN_TEMPLATE
    (tmp_path / "t.jinja").write_text(CHATML_TEMPLATE)
    assert resolve_template(str(tmp_path / "t.jinja")) == CHATML_TEMPLATE
    with pytest.raises(CheckpointError, match="no_such.jinja"):
        resolve_template(str(tmp_path / "no_such.jinja"))


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('No tools here') }}", "its chat template fails \\(No tools here\\)"),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %", "its chat template fails"),          # jinja syntax
    ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}", "closes the assistant turn with no special token"),
])
def test_template_faults_are_one_line_naming_the_model(base_tok, tmp_path, template, message):
    fresh(base_tok, template).save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match=message) as e:
        load_tokenizer(str(tmp_path / "m"))
    assert str(tmp_path / "m") in str(e.value) and "\n" not in str(e.value)
