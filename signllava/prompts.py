"""Prompt text, the four tasks, and the token layout of one sample.

A sample is rendered through the tokenizer's own chat template (Llama-3 format):

    system: SYSTEM_PROMPT
    user:   <VISUAL>\n<task prompt, with context if any>
    assistant: <answer>

<VISUAL> is one segment per modality, `<video_start> frame_1 … frame_T <video_end>`, in a fixed modality
order. The marker tokens are reserved special tokens of the tokenizer (no vocabulary growth); frame
positions hold the pad id in `input_ids` and are replaced by projected features in the model.
Labels are -100 everywhere except the answer tokens and the end-of-turn token that closes them.
The generation prompt is the same ids up to and including `<|start_header_id|>assistant<|end_header_id|>\n\n`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
    words = _words(translation)
    positives = list(dict.fromkeys(k.lower() for k in keywords))
    if task == "is_reversed":
        rev = bool(rng.random() < 0.5)
        return TaskSample(IS_REVERSED, "yes" if rev else "no", reverse_time=rev)
    negatives = [w for w in vocabulary if w not in positives and not mentions(words, w)]
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


# --------------------------------------------------------------------------------------- token layout
class PromptBuilder:
    """Turns (segments, prompt, answer) into input_ids / labels / frame layout with one tokenizer."""

    def __init__(self, tokenizer, marker_ids: tuple[int, int], pad_id: int, system_prompt: str = SYSTEM_PROMPT):
        self.tok = tokenizer
        self.start_id, self.end_id = marker_ids
        self.pad_id = pad_id
        self.system_prompt = system_prompt

    def _render(self, user: str, answer: str | None) -> str:
        msgs = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]
        if answer is None:
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        msgs.append({"role": "assistant", "content": answer})
        return self.tok.apply_chat_template(msgs, tokenize=False)

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
                raise ValueError("chat template: the generation prompt is not a prefix of the full conversation")
            answer_ids = self._encode(full_text[len(gen_text):])
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
    end-of-turn id generation stops at (<|eot_id|>, not <|end_of_text|>: see Llama-3 never-stops bugs)."""
    def tid(t):
        i = tokenizer.convert_tokens_to_ids(t)
        return None if i in (None, tokenizer.unk_token_id) else i
    markers = tuple(tid(t) for t in MARKER_TOKENS)
    if None in markers:
        raise ValueError(f"tokenizer lacks the marker tokens {MARKER_TOKENS}; call setup_special_tokens first")
    pad = tid("<|finetune_right_pad_id|>")
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eot = tid("<|eot_id|>")
    if eot is None:
        eot = tokenizer.eos_token_id
    return {"markers": markers, "pad": pad, "eot": eot}
