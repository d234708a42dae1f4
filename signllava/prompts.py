"""Prompt text, the four tasks, and the token layout of one sample.

A sample is rendered through the tokenizer's own chat template, whatever its family (Llama 3, ChatML,
Gemma, Mistral, ...; a template-less base model gets BUILTIN_TEMPLATE):

    system: SYSTEM_PROMPT                  (folded into the user turn when the template has no system role)
    user:   <VISUAL>\n<task prompt, with context if any>
    assistant: <answer>

<VISUAL> is one segment per modality, `<video_start> frame_1 … frame_T <video_end>`, in a fixed modality
order. The marker tokens are Llama 3's reserved special tokens (appended to other vocabularies); frame
positions hold the pad id in `input_ids` and are replaced by projected features in the model.
Labels are -100 everywhere except the answer tokens and the end-of-turn token that closes them (read
from the template: what it writes right after an answer, e.g. <|eot_id|>, <|im_end|>, <end_of_turn>;
anything the template writes after that token, like ChatML's newline, is not trained). The generation
prompt is the same ids up to the answer (Llama 3: up to `<|start_header_id|>assistant<|end_header_id|>\n\n`).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from signllava.errors import CheckpointError

SYSTEM_PROMPT = ("You are a helpful assistant that understands American Sign Language (ASL). "
                 "The user's video is given as one or more streams of visual features, each between "
                 "a start and an end marker. You translate ASL into English and answer questions "
                 "about which signs the video contains.")
TRANSLATE = "Translate the given American Sign Language video into English."
TRANSLATE_WITH_CONTEXT = ("Here are some preceding sentences as context: '{context}'. Translate the next "
                          "sentence given by the American Sign Language video into English.")
ONE_WORD = "Given the ASL video input, answer the following question with 'yes' or 'no': Is the sign '{word}' present?"
MULTI_WORD = ("Given the ASL video input, answer the following questions with 'yes' or 'no' for each sign "
              "listed, separated by commas: Are the signs '{words}' present?")
IS_REVERSED = ("Given the video input, answer the following question with 'yes' or 'no': Is the video "
               "presented in reversed temporal order?")
TASKS = ("translation", "one_word_present", "multi_word_present", "is_reversed")

# Reserved Llama-3 special tokens used as segment markers (present in Llama 3.0 and 3.1 tokenizers).
MARKER_TOKENS = ("<|reserved_special_token_100|>", "<|reserved_special_token_101|>")
_VISUAL = "\x00VISUAL\x00"          # a placeholder no tokenizer will produce from real text


def context_ids(position: int, context_window: int, prelude_window: int) -> list[int]:
    """Positions in clip_order whose sentences form the context of the clip at `position`:
    the first P sentences of the video plus the last C before the clip (all preceding if fewer)."""
    c, C, P = position, context_window, prelude_window
    if C == 0 and P == 0:
        return []
    if c >= C + P:
        return list(range(P)) + list(range(c - C, c))
    return list(range(c))


def imperfect_context(context: list[str], rng: np.random.Generator, dropout: float, noise: float,
                      pool: list[str]) -> list[str]:
    """Training context made as unreliable as a model's own earlier outputs: all of it left out with
    probability `dropout`; otherwise each sentence corrupted with probability `noise` by one of: words
    dropped, two words swapped, one word replaced by a word of another sentence, or the whole sentence
    replaced by another clip's (`pool`: the split's sentences)."""
    if rng.random() < dropout:
        return []
    out = []
    for sentence in context:
        words = sentence.split()
        if rng.random() >= noise or not words:
            out.append(sentence)
            continue
        kind = int(rng.integers(4))
        other = pool[int(rng.integers(len(pool)))].split() or words
        if kind == 0 and len(words) > 1:          # drop: each word with p 1/4, at least one, never all
            drop = rng.random(len(words)) < 0.25
            drop[int(rng.integers(len(words)))] = True
            words = [w for w, d in zip(words, drop) if not d] or words[:1]
        elif kind == 1 and len(words) > 1:        # swap two distinct positions
            a, b = rng.choice(len(words), 2, replace=False)
            words[a], words[b] = words[b], words[a]
        elif kind == 2:                           # substitute one word
            words[int(rng.integers(len(words)))] = other[int(rng.integers(len(other)))]
        else:                                     # another clip's sentence
            words = other
        out.append(" ".join(words))
    return out


def translation_prompt(context: list[str]) -> str:
    if context:
        return TRANSLATE_WITH_CONTEXT.format(context=" ".join(context))
    return TRANSLATE


# ------------------------------------------------------------------------------------------------ tasks
def _words(text: str) -> list[str]:
    return "".join(ch.lower() if ch.isalnum() or ch in "'-" else " " for ch in text).split()


def mentions(translation_words: list[str], keyword: str) -> bool:
    """Case-insensitive, token-level: 'cat' is not in 'category', 'new york' is in 'I love New York.'"""
    kw = _words(keyword)
    n = len(kw)
    return n > 0 and any(translation_words[i:i + n] == kw for i in range(len(translation_words) - n + 1))


@dataclass
class TaskSample:
    prompt: str
    answer: str
    reverse_time: bool = False


def make_task(task: str, translation: str, keywords: list[str], vocabulary: list[str],
              rng: np.random.Generator, max_num_words: int = 5) -> TaskSample | None:
    """Build a yes/no task for one clip (reference §4, with its case and substring bugs fixed and
    every sampling loop bounded). Returns None when the clip cannot carry the task (no candidates)."""
    if task == "is_reversed":
        rev = bool(rng.random() < 0.5)
        return TaskSample(IS_REVERSED, "yes" if rev else "no", reverse_time=rev)
    positives, negatives = _candidates(translation, keywords, vocabulary)
    if task == "one_word_present":
        use_pos = positives and (not negatives or rng.random() < 0.5)
        pool = positives if use_pos else negatives
        if not pool:
            return None
        word = pool[int(rng.integers(len(pool)))]
        return TaskSample(ONE_WORD.format(word=word), "yes" if use_pos else "no")
    if task == "multi_word_present":
        n = int(rng.integers(2, max_num_words + 1))
        n_pos = min(len(positives), n // 2)
        n_neg = min(n - n_pos, len(negatives))
        if n_pos + n_neg < 2:
            return None
        pos = [positives[i] for i in rng.choice(len(positives), n_pos, replace=False)] if n_pos else []
        neg = [negatives[i] for i in rng.choice(len(negatives), n_neg, replace=False)] if n_neg else []
        pairs = sorted([(w, "yes") for w in pos] + [(w, "no") for w in neg])
        return TaskSample(MULTI_WORD.format(words=", ".join(w for w, _ in pairs)), ", ".join(a for _, a in pairs))
    raise ValueError(f"unknown task {task!r}")


def _candidates(translation: str, keywords: list[str], vocabulary: list[str],
                limit: int | None = None) -> tuple[list[str], list[str]]:
    """(the clip's keywords lowercased, vocabulary words it does not mention): the yes and no words of its
    questions; `limit` stops the negatives there (enough to know whether a task can be asked)."""
    words = _words(translation)
    positives = list(dict.fromkeys(k.lower() for k in keywords))
    negatives = []
    for w in vocabulary:
        if w not in positives and not mentions(words, w):
            negatives.append(w)
            if limit is not None and len(negatives) >= limit:
                break
    return positives, negatives


def carry_chance(task: str, translation: str, keywords: list[str], vocabulary: list[str],
                 max_num_words: int = 5) -> float:
    """The chance that make_task gives this clip `task` rather than None (a clip that cannot carry its drawn task
    is a translation sample instead): 0 or 1, except multi_word_present, whose word count is drawn."""
    if task in ("translation", "is_reversed"):
        return 1.0
    n_pos, n_neg = map(len, _candidates(translation, keywords, vocabulary, limit=2))
    if task == "one_word_present":
        return float(n_pos + n_neg > 0)
    counts = range(2, max_num_words + 1)
    ok = [min(n_pos, n // 2) + min(n - min(n_pos, n // 2), n_neg) >= 2 for n in counts]
    return sum(ok) / len(ok) if ok else 0.0


# ----------------------------------------------------------------------------------------- templates
# For a base model without a chat template (or `--chat_template builtin`): plain role lines, each turn closed
# by the tokenizer's end-of-sequence token, which is thus the end-of-turn token the model learns to emit.
BUILTIN_TEMPLATE = (
    "{%- if bos_token and bos_token != eos_token %}{{ bos_token }}{% endif %}"
    "{%- for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] | trim }}"
    "{{ eos_token }}\n{% endfor %}"
    "{%- if add_generation_prompt %}Assistant:{% endif %}")
# Templates that print today's date (Llama 3.1/3.2) see this one, in training and generation alike.
TEMPLATE_DATE = datetime.date(2024, 7, 26)
_PROBE_SYSTEM, _PROBE_USER, _PROBE_ANSWER = "Probe system text.", "Probe user text.", "Probe answer text."


def model_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def resolve_template(spec: str | None) -> str | None:
    """--chat_template: None (the model's own), 'builtin', or a Jinja file -> template text (None: own)."""
    if spec is None:
        return None
    if spec == "builtin":
        return BUILTIN_TEMPLATE
    try:
        return Path(spec).read_text(encoding="utf-8")
    except OSError as e:
        raise CheckpointError(f"--chat_template {spec}: cannot read the template file ({e.strerror})") from None


def _fixed_date_macro() -> str:
    """A Jinja macro `strftime_now(fmt)` for TEMPLATE_DATE. Defined at the top of a template it shadows the
    wall-clock global transformers provides (a template variable cannot: callables are stripped from them)."""
    chain = "".join(f" | replace('{d}', '{TEMPLATE_DATE.strftime(d)}')"
                    for d in ("%d", "%b", "%B", "%Y", "%y", "%m", "%a", "%A", "%j", "%H", "%M", "%S", "%%"))
    return "{%- macro strftime_now(fmt) -%}{{ fmt" + chain + " }}{%- endmacro %}"


DATE_MACRO = _fixed_date_macro()


def render_chat(tokenizer, messages: list[dict], generation: bool) -> str:
    """The template's text for `messages` with a fixed date; any template error as one line naming the model."""
    template = tokenizer.chat_template
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation,
            chat_template=DATE_MACRO + template if isinstance(template, str) else None,
            date_string=TEMPLATE_DATE.strftime("%d %b %Y"))
    except Exception as e:      # jinja2 TemplateError / TypeError / ValueError from the model's own template
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{model_name(tokenizer)}: its chat template fails ({first})") from None


@dataclass(frozen=True)
class ChatLayout:
    fold_system: bool       # the template has no system role: the system prompt opens the first user turn
    eot: int                # the token that closes an assistant turn: last label, stop token


def fold(system: str, user: str) -> str:
    return f"{system}\n\n{user}"


def chat_layout(tokenizer) -> ChatLayout:
    """Probe the template: does it keep a system message, and which special token follows an answer."""
    name = model_name(tokenizer)
    user = {"role": "user", "content": _PROBE_USER}
    try:
        text = render_chat(tokenizer, [{"role": "system", "content": _PROBE_SYSTEM}, user], generation=True)
        fold_system = _PROBE_SYSTEM not in text      # some templates drop a system message silently
    except CheckpointError:                          # Gemma: raise_exception('System role not supported')
        fold_system = True
    if fold_system:
        user = {"role": "user", "content": fold(_PROBE_SYSTEM, _PROBE_USER)}
    full = render_chat(tokenizer, [user, {"role": "assistant", "content": _PROBE_ANSWER}], generation=False)
    if _PROBE_ANSWER not in full:
        raise CheckpointError(f"{name}: its chat template does not print the assistant's answer")
    after = full[full.index(_PROBE_ANSWER) + len(_PROBE_ANSWER):]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    eot = next((i for i in ids if i in special), None)
    if eot is None:
        raise CheckpointError(f"{name}: its chat template closes the assistant turn with no special token "
                              f"({after!r}); give --chat_template builtin or a template file")
    return ChatLayout(fold_system, eot)


# --------------------------------------------------------------------------------------- token layout
class PromptBuilder:
    """Turns (segments, prompt, answer) into input_ids / labels / frame layout with one tokenizer."""

    def __init__(self, tokenizer, marker_ids: tuple[int, int], pad_id: int, system_prompt: str = SYSTEM_PROMPT):
        self.tok = tokenizer
        self.start_id, self.end_id = marker_ids
        self.pad_id = pad_id
        self.system_prompt = system_prompt
        self.layout = chat_layout(tokenizer)

    def _render(self, user: str, answer: str | None) -> str:
        if self.layout.fold_system:
            msgs = [{"role": "user", "content": fold(self.system_prompt, user)}]
        else:
            msgs = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
        return render_chat(self.tok, msgs, generation=answer is None)

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def build(self, frame_counts: list[int], prompt: str, answer: str | None):
        """Returns (input_ids, labels, segment_of_position) as int64/int64/int16 numpy arrays.

        segment_of_position[i] = k for frame positions of the k-th modality segment, -1 elsewhere.
        With answer=None this is the generation prompt (labels all -100)."""
        user = f"{_VISUAL}\n{prompt}"
        gen_text = self._render(user, None)
        before, after = gen_text.split(_VISUAL)
        ids = self._encode(before)
        seg = [-1] * len(ids)
        for k, t in enumerate(frame_counts):
            ids += [self.start_id] + [self.pad_id] * t + [self.end_id]
            seg += [-1] + [k] * t + [-1]
        after_ids = self._encode(after)
        ids += after_ids
        seg += [-1] * len(after_ids)
        labels = [-100] * len(ids)
        if answer is not None:
            full_text = self._render(user, answer)
            if not full_text.startswith(gen_text):
                raise CheckpointError(f"{model_name(self.tok)}: its chat template's generation prompt is not a "
                                      f"prefix of the conversation with the answer")
            answer_ids = self._encode(full_text[len(gen_text):])
            if self.layout.eot not in answer_ids:
                raise CheckpointError(f"{model_name(self.tok)}: its chat template does not close the answer "
                                      f"{answer!r} with its end-of-turn token")
            answer_ids = answer_ids[:answer_ids.index(self.layout.eot) + 1]    # what follows it is never generated
            ids += answer_ids
            labels += answer_ids
            seg += [-1] * len(answer_ids)
        return (np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64), np.asarray(seg, dtype=np.int16))


def setup_special_tokens(tokenizer) -> bool:
    """Make sure the marker tokens exist. Llama-3 tokenizers have them as reserved tokens; for any
    other tokenizer they are added (the caller must then resize the model's embeddings).
    Returns True if tokens were added."""
    missing = [t for t in MARKER_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": list(missing)}, replace_extra_special_tokens=False)
    return bool(missing)


def special_ids(tokenizer) -> dict:
    """marker ids, pad id (masked everywhere, so any id works; prefer Llama-3's reserved pad) and the
    end-of-turn id generation stops at: the one the template closes an answer with (<|eot_id|>, not
    <|end_of_text|>, for Llama 3; <end_of_turn>, not <eos>, for Gemma), so the one trained as the last label."""
    def tid(t):
        i = tokenizer.convert_tokens_to_ids(t)
        return None if i in (None, tokenizer.unk_token_id) else i
    markers = tuple(tid(t) for t in MARKER_TOKENS)
    if None in markers:
        raise ValueError(f"tokenizer lacks the marker tokens {MARKER_TOKENS}; call setup_special_tokens first")
    pad = tid("<|finetune_right_pad_id|>")
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"markers": markers, "pad": pad, "eot": chat_layout(tokenizer).eot}
