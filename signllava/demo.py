"""The built-in demo: a synthetic sign language (the data) and a tiny random-init Llama (the model).

## The demo language

Synthetic, learnable sign language in the on-disk layout of the How2Sign features.

`make_demo(out_dir)` writes annotations plus MAE / sign2vec / DINO / pose feature shards
exactly as the real How2Sign release is laid out, so the rest of the pipeline can be
smoke-tested (and can actually learn something) without the real data:

    OUT/annotation.<split>.json
    OUT/<mod>/metadata_<mod>.<split>.json   {video_id: shard}
    OUT/<mod>/<mod>.<split>.<shard>.h5      h5[video_id][clip_name] = float16 [T, D]

The language: ~40 glosses signed in topic-comment, verb-final order without articles or
prepositions ("APPLE RED MAN EAT" -> "the man eats the red apple", "STORE ANNA GO" ->
"Anna goes to the store", "DOG BIG" -> "the dog is big", "BOOK BOY READ NOT" -> "the boy
does not read the book"). The English translation is a deterministic function of the
gloss sequence (`gloss_to_english`), so a model must recognise signs, reorder them and
insert function words. Every gloss has a fixed random prototype per modality; a clip's
frames are noisy copies of its signs' prototypes joined by transition frames.

Written by `python data.py --make_demo OUT_DIR`.

With `--demo_context` (`make_demo(..., context=True)`) sentences of a video also refer back: with
probability 1/2, a sentence whose subject could be the previous sentence's subject (same kind, the
sentence stays sensible) signs the pointing sign IX in its place, and the English names that referent
again ("STORE TOM GO", then "BOOK IX READ" -> "Tom reads the book"). A clip's translation then depends
on the sentence before it: what `--context_window 1` can learn and generate.py's context modes
measure. Without the option the data are byte-identical to the plain demo.

## The tiny LLM

The embedded default LLM: a small random-init Llama and a byte-level BPE tokenizer with Llama-3's
special tokens and chat template, trained offline on the data's own sentences.

Used when no `--model` is given, so that the demo and the tests need no download. The pair is saved
once into `<output_dir>/base_model/` and later stages and generation load it from there.
"""
import json
from pathlib import Path

import h5py
import numpy as np
import torch

from signllava.atomic import building_dir, replace_dir
from signllava.prompts import IS_REVERSED, MARKER_TOKENS, MULTI_WORD, ONE_WORD, SYSTEM_PROMPT, TRANSLATE, TRANSLATE_WITH_CONTEXT

# --- lexicon ---------------------------------------------------------------------------
NAMES = {"ANNA": "Anna", "TOM": "Tom", "MARIA": "Maria"}
NOUN_KIND = {"MAN": "person", "WOMAN": "person", "BOY": "person", "GIRL": "person",
             "TEACHER": "person", "DOG": "animal", "CAT": "animal", "BIRD": "animal",
             "APPLE": "food", "CAKE": "food", "BANANA": "food", "BOOK": "text",
             "LETTER": "text", "BALL": "thing", "CAR": "thing", "HAT": "thing",
             **{g: "person" for g in NAMES}}
PLACES = ["STORE", "SCHOOL", "PARK", "LIBRARY"]
# Selectional restrictions keep sentences sensible ("the red apple", not "the red man").
ADJ_KINDS = {"RED": {"food", "thing"}, "BIG": {"animal", "food", "thing"},
             "SMALL": {"animal", "food", "thing"}, "OLD": {"person", "animal", "text", "thing"},
             "NEW": {"text", "thing"}, "HAPPY": {"person", "animal"},
             "TIRED": {"person", "animal"}}
# gloss: (3sg, base, -ing, past participle, object kinds, object article, synonym 3sg);
# -ing is None for stative verbs ("is liking" is not English). The object article depends
# on the verb, which is signed last, so the learner must look ahead.
TRANS = {"EAT": ("eats", "eat", "eating", "eaten", {"food"}, "the", None),
         "READ": ("reads", "read", "reading", "read", {"text"}, "the", None),
         "SEE": ("sees", "see", None, "seen", {"person", "animal", "thing"}, "the", "spots"),
         "LIKE": ("likes", "like", None, "liked", {"person", "animal", "food", "thing"},
                  "the", "is fond of"),
         "HELP": ("helps", "help", "helping", "helped", {"person", "animal"}, "the", "assists"),
         "WANT": ("wants", "want", None, "wanted", {"animal", "food", "text", "thing"},
                  "a", "would like"),
         "BUY": ("buys", "buy", "buying", "bought", {"food", "text", "thing"}, "a", "purchases"),
         "FIND": ("finds", "find", None, "found", {"animal", "text", "thing"}, "a",
                  "discovers")}
MOTION = {"GO": ("goes", "going", "heads"), "WALK": ("walks", "walking", None),
          "DRIVE": ("drives", "driving", None)}
NEG = "NOT"
GLOSSES = list(NOUN_KIND) + PLACES + list(ADJ_KINDS) + list(TRANS) + list(MOTION) + [NEG]
GLOSS_ID = {g: i for i, g in enumerate(GLOSSES)}
# The pointing sign of --demo_context: its prototype row sits after the rest row, so the plain demo's
# prototypes (and with them its data) do not change.
PRONOUN = "IX"
PRONOUN_ID = len(GLOSSES) + 1
PEOPLE = [g for g, k in NOUN_KIND.items() if k == "person"]

SPLITS = {"train": 3, "dev": 2, "test": 1}  # split -> number of shards
# modality -> parts drawn separately (dino = face | left hand | right hand)
MODALITIES = {"mae": [768], "sign2vec": [768], "dino": [384, 384, 384], "pose": [208]}
NOISE = 0.3


def sample_glosses(rng):
    """One random sentence, directly in sign order (topic first, verb last)."""
    t = rng.choice(4, p=[0.45, 0.15, 0.25, 0.15])
    if t == 3:  # predicate adjective: NOUN ADJ
        noun = str(rng.choice([g for g in NOUN_KIND if g not in NAMES]))
        return [noun, str(rng.choice([a for a, k in ADJ_KINDS.items() if NOUN_KIND[noun] in k]))]
    subj = str(rng.choice(PEOPLE))
    if t == 2:  # motion: PLACE SUBJ VERB
        return [str(rng.choice(PLACES)), subj, str(rng.choice(list(MOTION)))]
    verb = str(rng.choice(list(TRANS)))
    obj = str(rng.choice([g for g, k in NOUN_KIND.items() if k in TRANS[verb][4] and g != subj]))
    adjs = [a for a, k in ADJ_KINDS.items() if NOUN_KIND[obj] in k and obj not in NAMES]
    adj = [str(rng.choice(adjs))] if t == 0 and adjs and rng.random() < 0.5 else []
    return [obj, *adj, subj, verb] + ([NEG] if t == 1 else [])


def parse(glosses):
    """Recover the sentence structure from a gloss sequence (inverse of the sign order)."""
    g = list(glosses)
    s = {"neg": g[-1] == NEG, "adj": None, "obj": None, "place": None}
    if s["neg"]:
        g = g[:-1]
    if g[-1] in ADJ_KINDS:
        return {**s, "form": "pred", "subj": g[0], "adj": g[1]}
    if g[-1] in MOTION:
        return {**s, "form": "motion", "place": g[0], "subj": g[1], "verb": g[2]}
    return {**s, "form": "trans", "obj": g[0], "adj": g[1] if len(g) == 4 else None,
            "subj": g[-2], "verb": g[-1]}


def noun_phrase(noun, adj=None, art="the"):
    if noun in NAMES:
        return NAMES[noun]
    words = ([adj.lower()] if adj else []) + [noun.lower()]
    if art == "a" and words[0][0] in "aeiou":
        art = "an"
    return " ".join([art] + words)


def gloss_to_english(glosses):
    """The reference translation: a pure function of the gloss sequence."""
    s = parse(glosses)
    subj = noun_phrase(s["subj"])
    if s["form"] == "pred":
        return f"{subj} is {s['adj'].lower()}"
    if s["form"] == "motion":
        return f"{subj} {MOTION[s['verb']][0]} to the {s['place'].lower()}"
    v = TRANS[s["verb"]]
    obj = noun_phrase(s["obj"], s["adj"], v[5])
    return f"{subj} does not {v[1]} {obj}" if s["neg"] else f"{subj} {v[0]} {obj}"


def paraphrase_candidates(glosses):
    """Meaning-preserving rewrites: progressive, contraction, passive, synonym, article."""
    s = parse(glosses)
    subj, adj = noun_phrase(s["subj"]), (s["adj"] or "").lower()
    a_subj = None if s["subj"] in NAMES else noun_phrase(s["subj"], art="a")
    if s["form"] == "pred":
        return [f"{subj}'s {adj}", f"it is {noun_phrase(s['subj'], s['adj'], 'a')}",
                f"it's {noun_phrase(s['subj'], s['adj'], 'a')}"]
    if s["form"] == "motion":
        v3, ving, syn = MOTION[s["verb"]]
        rest = f"to the {s['place'].lower()}"
        out = [f"{subj} is {ving} {rest}", f"{subj} {v3} over {rest}"]
        out += [f"{x} {rest}" for x in (a_subj and f"{a_subj} {v3}", syn and f"{subj} {syn}") if x]
        return out
    v3, base, ving, pp, _, art, syn = TRANS[s["verb"]]
    obj = noun_phrase(s["obj"], s["adj"], art)
    if s["neg"]:
        out = [f"{subj} doesn't {base} {obj}", f"{obj} is not {pp} by {subj}"]
        if ving:
            out += [f"{subj} is not {ving} {obj}", f"{subj} isn't {ving} {obj}"]
        return out + ([f"{a_subj} does not {base} {obj}"] if a_subj else [])
    out = [f"{obj} is {pp} by {subj}"] + ([f"{subj} is {ving} {obj}"] if ving else [])
    if s["obj"] not in NAMES:
        out.append(f"{subj} {v3} {noun_phrase(s['obj'], s['adj'], 'a' if art == 'the' else 'the')}")
    return out + [x for x in (a_subj and f"{a_subj} {v3} {obj}", syn and f"{subj} {syn} {obj}") if x]


def keywords(glosses):
    """Content words as they appear in the English sentence, in order, deduplicated."""
    s = parse(glosses)
    word = lambda g: NAMES.get(g, g.lower())
    if s["form"] == "pred":
        kws = [word(s["subj"]), word(s["adj"])]
    elif s["form"] == "motion":
        kws = [word(s["subj"]), MOTION[s["verb"]][0], word(s["place"])]
    else:
        verb = TRANS[s["verb"]][1 if s["neg"] else 0]
        kws = [word(s["subj"]), verb] + ([word(s["adj"])] if s["adj"] else []) + [word(s["obj"])]
    return list(dict.fromkeys(kws))


def subject_index(glosses) -> int:
    """Where the subject is signed: first in a predicate sentence, after the place in a motion sentence,
    before the verb (and NOT) in a transitive one."""
    form = parse(glosses)["form"]
    if form == "pred":
        return 0
    if form == "motion":
        return 1
    return len(glosses) - (3 if glosses[-1] == NEG else 2)


def refer_back(sentences: list[list[str]], rng) -> tuple[list[list[str]], list[list[str]]]:
    """A video's sentences in time order -> (meaning glosses, signed glosses): with probability 1/2 a
    sentence takes the previous sentence's subject as its own when that keeps it sensible (same kind; no
    name as a predicate subject; not its own object), and signs it as PRONOUN."""
    meant, signed, prev = [], [], None
    for g in sentences:
        g, s = list(g), parse(g)
        j, subj = subject_index(g), s["subj"]
        fits = (prev is not None and NOUN_KIND[prev] == NOUN_KIND[subj] and prev != s["obj"]
                and not (s["form"] == "pred" and prev in NAMES))
        shown = list(g)
        if fits and rng.random() < 0.5:
            g[j], shown[j] = prev, PRONOUN
        meant.append(g)
        signed.append(shown)
        prev = g[j]
    return meant, signed


def make_prototypes(rng):
    """Fixed per-gloss vectors per modality; the extra last row (zeros) is the rest pose."""
    protos = {}
    for mod, parts in MODALITIES.items():
        p = np.concatenate([rng.standard_normal((len(GLOSSES), d)) for d in parts], axis=1)
        protos[mod] = np.vstack([p, np.zeros((1, p.shape[1]))]).astype(np.float32)
    return protos


def frame_plan(glosses, rng):
    """Per frame, the two prototype rows it averages: sign frames hold one gloss, a
    transition frame sits halfway between neighbours, rest frames pad both ends."""
    rest = len(GLOSSES)
    a, b = [rest], [rest]
    for i, g in enumerate(glosses):
        gid = PRONOUN_ID if g == PRONOUN else GLOSS_ID[g]
        if i:  # transition frame
            a.append(a[-1])
            b.append(gid)
        n = int(rng.integers(3, 5))
        a += [gid] * n
        b += [gid] * n
    a.append(rest), b.append(rest)
    return np.array(a), np.array(b)


def clip_features(glosses, protos, rng):
    """All four streams from the same underlying sign sequence (same frame plan)."""
    a, b = frame_plan(glosses, rng)
    feats = {}
    for mod, p in protos.items():
        mean = 0.5 * (p[a] + p[b])
        if mod == "sign2vec":  # half frame rate: every second frame, T//2 frames (>= 1)
            mean = mean[1::2] if len(mean) > 1 else mean
        noise = rng.standard_normal(mean.shape, dtype=np.float32)
        feats[mod] = (mean + NOISE * noise).astype(np.float16)
    return feats


def write_json(path, obj):
    # In place: make_demo only ever writes into a fresh folder that write_demo renames into place when complete.
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False, ensure_ascii=False)


def make_split(out, split, n_videos, n_shards, protos, rng, context_rng=None):
    """One split; `context_rng` (--demo_context) makes sentences refer back to the previous one."""
    videos = [f"demo{split}{i:04d}" for i in range(n_videos)]
    shard_of = {v: i % n_shards for i, v in enumerate(videos)}
    annotation = {}
    h5s = {(m, s): h5py.File(out / m / f"{m}.{split}.{s}.h5", "w")
           for m in MODALITIES for s in sorted(set(shard_of.values()))}
    try:
        for vid in videos:
            clips = {f"{vid}_{k}-5-rgb_front": sample_glosses(rng)
                     for k in range(int(rng.integers(4, 13)))}
            signed = clips
            if context_rng is not None:      # the dict keeps time order (k); clip_order below does not
                meant, shown = refer_back(list(clips.values()), context_rng)
                clips, signed = dict(zip(clips, meant)), dict(zip(clips, shown))
            order = sorted(clips)  # plain text order, as in the real How2Sign annotation
            entry = {"clip_order": order}
            groups = {m: h5s[m, shard_of[vid]].create_group(vid) for m in MODALITIES}
            for name in order:
                g = clips[name]
                cands = paraphrase_candidates(g)
                k = min(len(cands), int(rng.integers(2, 4)))
                para = [cands[i] for i in sorted(rng.choice(len(cands), k, replace=False))]
                entry[name] = {
                    "translation": gloss_to_english(g),
                    "paraphrases": ["<none>", "<none>"] if rng.random() < 0.1 else para,
                    "keywords": [] if rng.random() < 0.1 else keywords(g)}
                for m, x in clip_features(signed[name], protos, rng).items():
                    groups[m].create_dataset(name, data=x, track_times=False)
            annotation[vid] = entry
    finally:
        for f in h5s.values():
            f.close()
    write_json(out / f"annotation.{split}.json", annotation)
    for m in MODALITIES:
        write_json(out / m / f"metadata_{m}.{split}.json", shard_of)


def make_demo(out_dir: str, seed: int = 0, n_train_videos: int = 150,
              n_dev_videos: int = 20, n_test_videos: int = 20, context: bool = False) -> None:
    """Write the synthetic dataset to out_dir; same seed -> identical output. `context`: sentences refer
    back to the previous one (refer_back)."""
    out = Path(out_dir)
    for m in MODALITIES:           # (write_demo gives it a fresh folder; the h5 shards below are written in it)
        (out / m).mkdir(parents=True, exist_ok=True)
    # Independent streams so that changing one split's size leaves the others unchanged.
    protos = make_prototypes(np.random.default_rng([seed, 0]))
    if context:
        pronoun = np.random.default_rng([seed, 0, 1])
        protos = {m: np.vstack([p, pronoun.standard_normal((1, p.shape[1]))]).astype(np.float32)
                  for m, p in protos.items()}
    sizes = {"train": n_train_videos, "dev": n_dev_videos, "test": n_test_videos}
    for i, (split, n_shards) in enumerate(SPLITS.items(), start=1):
        rng = np.random.default_rng([seed, i])
        context_rng = np.random.default_rng([seed, i, 1]) if context else None
        make_split(out, split, sizes[split], n_shards, protos, rng, context_rng)


DEMO_NAMES = {f"annotation.{split}.json" for split in SPLITS} | set(MODALITIES)     # all a demo folder holds


def write_demo(out_dir, **kwargs) -> Path:
    """make_demo built in a temporary sibling and renamed into place, so `out_dir` is the whole demo or as it
    was. An earlier demo there is replaced; any other non-empty folder is refused: its files are the user's."""
    from signllava.errors import RunError
    from signllava.faults import write_failure
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: exists and is not a directory")
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if not names <= DEMO_NAMES:
        raise RunError(f"{out}: not empty and not an earlier demo ({len(names - DEMO_NAMES)} other entries); the demo "
                       f"never overwrites what it did not write: give an empty or new folder")
    try:
        with building_dir(out) as tmp:
            make_demo(str(tmp), **kwargs)
            replace_dir(tmp, out, replace_existing=bool(names))
    except OSError as e:
        raise RunError(f"{out}: the demo data could not be written ({write_failure(e, out.parent) or e}); "
                       f"{out} is as it was") from None
    return out


# ------------------------------------------------------------------------------------------ tiny LLM

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
    with building_dir(out_dir) as tmp:   # complete or absent: a crash or a full disk never leaves half a base model
        tok.save_pretrained(tmp)
        llm.save_pretrained(tmp)
        replace_dir(tmp, out_dir)
    return out_dir
