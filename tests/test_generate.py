"""Tests of generate.py on a tiny model and dataset built here (no training, no downloads).

    DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 python -m pytest -q test_generate.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import generate
from generate import Translator, compute_metrics, yes_no_metrics
from signllava.decode_graph import base_causal_lm
from signllava.prompts import context_ids, translation_prompt
from tests.kit import chromium

HERE = Path(__file__).resolve().parent.parent     # the repository root
DIMS = {"mae": 6, "pose": 4}
MAX_FRAMES = 8
# video -> [(clip, frames, translation, keywords)]; vA_2 has no pose features (left out of the split).
VIDEOS = {
    "vA": [("vA_0", 5, "the cat sleeps on the warm mat", ["cat", "sleeps"]),
           ("vA_1", 12, "my brother reads a long book", ["brother", "book"]),
           ("vA_2", 4, "we walk home after school", ["walk", "school"]),
           ("vA_3", 3, "the dog runs in the park", ["dog", "park"])],
    "vB": [("vB_0", 9, "she drinks hot coffee every morning", ["coffee", "morning"]),
           ("vB_1", 2, "the old man sells fresh bread", ["man", "bread"]),
           ("vB_2", 7, "children play in the garden", ["children", "garden"])],
}
NO_POSE = {("vA", "vA_2")}


def write_data(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    ann = {}
    for v, clips in VIDEOS.items():
        ann[v] = {"clip_order": [c for c, *_ in clips]}
        for c, _, tr, kw in clips:
            ann[v][c] = {"translation": tr, "paraphrases": [], "keywords": kw}
    (root / "annotation.dev.json").write_text(json.dumps(ann))
    for m, d in DIMS.items():
        (root / m).mkdir(parents=True)
        (root / m / f"metadata_{m}.dev.json").write_text(json.dumps({v: 0 for v in VIDEOS}))
        with h5py.File(root / m / f"{m}.dev.0.h5", "w") as h:
            for v, clips in VIDEOS.items():
                g = h.create_group(v)
                for c, t, *_ in clips:
                    if m == "pose" and (v, c) in NO_POSE:
                        continue
                    g.create_dataset(c, data=rng.standard_normal((t, d)).astype(np.float16))
    return root


def write_checkpoint(root: Path, base: Path, dims=DIMS) -> Path:
    from model import SignConfig, assemble, load_tokenizer, save_projectors
    cfg = SignConfig(base_model=str(base), tokenizer=str(base), modalities=list(dims), dims=dict(dims),
                     projector_types={"mae": "mlp2x_gelu", "pose": "linear"}, context_window=1, prelude_window=1,
                     max_frames=MAX_FRAMES)
    root.mkdir(parents=True)
    tok, _ = load_tokenizer(str(base))
    torch.manual_seed(0)
    model = assemble(cfg, tok, torch.device("cpu"), torch.float32)
    with torch.no_grad():         # louder projected frames: outputs then depend on the clip
        for p in model.projectors.parameters():
            p.mul_(4.0)
    save_projectors(model.projector_state(), root)
    cfg.save(root)
    return root


def make_dataset(tr: Translator, data: Path, task: str = "translation", context_window: int = 1, prelude_window: int = 1):
    from data import DataOptions, SignDataset
    opts = DataOptions(modalities=list(tr.cfg.modalities), max_frames=tr.cfg.max_frames, frame_cap=tr.cfg.frame_cap,
                       context_window=context_window, prelude_window=prelude_window, task_weights={task: 1.0})
    ds = SignDataset(data, "dev", tr.builder, opts, train=False, expected_dims=tr.cfg.dims)
    ds.generation, ds.fixed_task = True, task
    return ds


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    from signllava.demo import build_default_llm
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # a tiny model: threads only cost (and thrash on a busy machine)
    root = tmp_path_factory.mktemp("gen")
    data = write_data(root / "data")
    texts = [tr for clips in VIDEOS.values() for _, _, tr, _ in clips]
    # A wide init makes the random model's output depend on the clip.
    base = build_default_llm(root / "base", texts, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, initializer_range=0.3)
    ckpt = write_checkpoint(root / "ckpt", base)
    tr = Translator.from_checkpoint(ckpt, device="cpu")
    # Make <|eot_id|> win where a token the model likes would: some outputs then stop early, others not.
    items = [make_dataset(tr, data)[i] for i in range(6)]
    first = tr.generate_ids(items[:1], 1, 12)[0]
    with torch.no_grad():
        w = tr.model.llm.get_output_embeddings().weight
        w[tr.ids["eot"]] = w[first[3]] * 1.05
    tr.model.llm.save_pretrained(base)
    yield {"root": root, "data": data, "base": base, "ckpt": ckpt, "tr": tr, "items": items}
    torch.set_num_threads(threads)


def run_cli(env, tmp: Path, *extra, name="out") -> tuple[dict, dict]:
    out, met = tmp / f"{name}.json", tmp / f"{name}.metrics.json"
    rc = generate.main(["--checkpoint", str(env["ckpt"]), "--data_dir", str(env["data"]), "--split", "dev",
                        "--output", str(out), "--metrics_out", str(met), "--num_workers", "0", "--device", "cpu",
                        *map(str, extra)])
    assert rc == 0
    return json.loads(out.read_text()), json.loads(met.read_text())


# ------------------------------------------------------------------------------------ references
def prompt_embeds(tr: Translator, item: dict) -> torch.Tensor:
    b = tr.collate([item])
    return tr.model.embed(b["input_ids"], b["features"], b["frame_index"])


@torch.inference_mode()
def manual_greedy(tr: Translator, item: dict, max_new: int) -> list[int]:
    """Argmax loop over the model's own full forward (no cache, no mask, no padding)."""
    emb, out = prompt_embeds(tr, item), []
    table = tr.model.llm.get_input_embeddings()
    for _ in range(max_new):
        t = int(tr.model.llm(inputs_embeds=emb).logits[0, -1].argmax())
        if t == tr.ids["eot"]:
            break
        out.append(t)
        emb = torch.cat([emb, table(torch.tensor([[t]]))], dim=1)
    return out


@torch.inference_mode()
def manual_beam(tr: Translator, item: dict, num_beams: int, max_new: int) -> list[int]:
    """Beam search written out (length_penalty 1, early_stopping False: HF's defaults): keep the best
    `num_beams` open hypotheses by summed log-prob; a hypothesis ending in <|eot_id|> (or at max_new) among
    the top `num_beams` candidates is finished with score sum/len; stop when `num_beams` are finished and
    the best open one, normalised by the current length, cannot beat the worst finished."""
    prompt, eot = prompt_embeds(tr, item), tr.ids["eot"]
    table = tr.model.llm.get_input_embeddings()
    running, finished = [([], 0.0)], []
    for t in range(1, max_new + 1):
        cands = []
        for toks, s in running:
            emb = torch.cat([prompt, table(torch.tensor([toks], dtype=torch.long))], dim=1) if toks else prompt
            lp = torch.log_softmax(tr.model.llm(inputs_embeds=emb).logits[0, -1].float(), -1)
            v, i = lp.topk(2 * num_beams)
            cands += [(s + float(a), toks + [int(b)]) for a, b in zip(v, i)]
        cands = sorted(cands, key=lambda c: -c[0])[:2 * num_beams]
        running = []
        for rank, (s, toks) in enumerate(cands):
            if toks[-1] == eot or t == max_new:
                if rank < num_beams:
                    finished.append((s / t, toks))
            elif len(running) < num_beams:
                running.append((toks, s))
        finished = sorted(finished, key=lambda f: -f[0])[:num_beams]
        if len(finished) == num_beams and running and running[0][1] / t <= finished[-1][0]:
            break
    best = finished[0][1]
    return best[:-1] if best[-1] == eot else best


@torch.inference_mode()
def hf_generate_ids(tr: Translator, items: list[dict], num_beams: int, max_new: int) -> list[list[int]]:
    """generate_ids without the shared prefill (the path before it): plain HF generate() on the left-padded
    batch's embeddings, which repeats every prompt num_beams times and prefills each copy."""
    b = tr.collate(items)
    emb = tr.model.embed(b["input_ids"], b["features"], b["frame_index"])
    eot = tr.ids["eot"]
    out = tr.model.llm.generate(inputs_embeds=emb, attention_mask=b["attention_mask"], num_beams=num_beams,
                                do_sample=False, max_new_tokens=max_new, eos_token_id=eot, pad_token_id=tr.ids["pad"],
                                use_cache=True)
    return [r[:r.index(eot)] if eot in r else r for r in out.tolist()]


def stage2_translators(env, tmp: Path, bits: int = 16) -> tuple[Translator, Translator]:
    """A stage-2 model (random non-zero LoRA on q, v; nf4 base if bits == 4): (Translator of its checkpoint
    written to `tmp` and loaded back, Translator of the model in memory)."""
    from model import ADAPTER_DIR, SignConfig, assemble, load_tokenizer, read_projector_file, save_projectors
    cfg = SignConfig.load(env["ckpt"])
    cfg.stage, cfg.bits = 2, bits
    cfg.lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    tok, _ = load_tokenizer(cfg.tokenizer)
    torch.manual_seed(1)
    model = assemble(cfg, tok, torch.device("cpu"), torch.float32, adapter="new")
    model.load_projector_state(read_projector_file(env["ckpt"] / "projectors.safetensors"), "stage 1")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    tmp.mkdir()
    save_projectors(model.projector_state(), tmp)
    model.llm.save_pretrained(str(tmp / ADAPTER_DIR))
    cfg.save(tmp)
    model.eval()
    return Translator.from_checkpoint(tmp, device="cpu"), Translator(model, tok, cfg, torch.device("cpu"))


# ------------------------------------------------------------------------------------ tests
def test_greedy_matches_manual_forward(env):
    tr, items = env["tr"], env["items"]
    got = [tr.generate_ids([it], num_beams=1, max_new_tokens=10)[0] for it in items]
    assert got == [manual_greedy(tr, it, 10) for it in items]
    assert any(len(g) < 10 for g in got) and any(len(g) == 10 for g in got)    # eot handled, and not always
    assert len({tuple(g) for g in got}) >= 3                                     # outputs depend on the clip


@pytest.mark.parametrize("num_beams,max_new", [(3, 8), (5, 12)])
def test_beam_matches_manual_beam_search(env, num_beams, max_new):
    tr, items = env["tr"], env["items"]
    got = [tr.generate_ids([it], num_beams=num_beams, max_new_tokens=max_new)[0] for it in items]
    assert got == [manual_beam(tr, it, num_beams, max_new) for it in items]
    greedy = [tr.generate_ids([it], num_beams=1, max_new_tokens=max_new)[0] for it in items]
    assert got != greedy                                                         # beam search did search
    assert tr.generate_ids(items, num_beams, max_new) == got                     # and batches


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_equals_one_at_a_time(env, num_beams):
    tr, items = env["tr"], env["items"]
    assert len({len(it["input_ids"]) for it in items}) > 3                        # real left padding
    single = [tr.generate_ids([it], num_beams, 10)[0] for it in items]
    assert tr.generate_ids(items, num_beams, 10) == single
    assert tr.generate_ids(items[::-1], num_beams, 10) == single[::-1]
    assert tr.generate_items(items, num_beams, 10) == [tr.decode(s) for s in single]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_no_repeat_ngram_size_cuts_loops(env, num_beams):
    """--no_repeat_ngram_size N: no N-gram twice in any hypothesis (here N = 1: the tiny model repeats tokens).
    generate() sees the generated ids only (the prompt goes in as embeddings), so the prompt's words stay allowed."""
    tr, items = env["tr"], env["items"]
    plain = tr.generate_ids(items, num_beams, 24)

    def repeats(row, n):
        grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
        return len(grams) - len(set(grams))
    assert any(repeats(r, 1) for r in plain)                                    # repeats to cut
    tr.no_repeat_ngram_size = 1
    try:
        guarded = tr.generate_ids(items, num_beams, 24)
    finally:
        tr.no_repeat_ngram_size = 0
    assert not any(repeats(r, 1) for r in guarded) and guarded != plain


@pytest.mark.parametrize("num_beams", [1, 3])
def test_shared_prefill_equals_plain_hf_generate(env, num_beams):
    tr, items = env["tr"], env["items"]
    assert len({len(it["input_ids"]) for it in items}) > 3                        # real left padding
    assert tr.model.llm.dtype == torch.float32
    ref = hf_generate_ids(tr, items, num_beams, 10)
    assert tr.generate_ids(items, num_beams, 10) == ref
    assert any(len(r) < 10 for r in ref) and any(len(r) == 10 for r in ref)    # eot handled, and not always


def test_shared_prefill_4bit_lora(env, tmp_path):
    """The stage-2 model as trained: nf4 base (bitsandbytes) under a peft LoRA adapter."""
    tr, _ = stage2_translators(env, tmp_path / "s2q", bits=4)
    assert type(tr.model.llm).__name__.startswith("Peft")
    assert any("4bit" in type(m).__name__ for m in tr.model.llm.modules())
    items = env["items"]
    for num_beams in (1, 3):
        assert tr.generate_ids(items, num_beams, 8) == hf_generate_ids(tr, items, num_beams, 8)
    ref = tr.generate_ids(items, 3, 8)
    tr.decode_steps = "static"              # decode_graph.py's fixed buffers behind peft and nf4 layers
    assert tr.generate_ids(items, 3, 8) == ref


def test_output_json_and_metrics(env, tmp_path):
    import sacrebleu
    out, met = run_cli(env, tmp_path, "--context", "gold", "--num_beams", 3, "--max_new_tokens", 10, "--batch_size", 4)
    assert list(out) == ["vA", "vB"]
    assert out["vA"]["clip_order"] == ["vA_0", "vA_1", "vA_3"]                   # vA_2 has no pose features
    assert out["vB"]["clip_order"] == ["vB_0", "vB_1", "vB_2"]
    clips = {c: tr for v in VIDEOS.values() for c, _, tr, _ in v}
    for v, vd in out.items():
        assert set(vd) == {"clip_order", *vd["clip_order"]}
        for c in vd["clip_order"]:
            # each clip's sentence scores; the gold context it was given (none for a video's first clip)
            context = {"context"} if c not in ("vA_0", "vB_0") else set()
            assert set(vd[c]) == {"translation", "paraphrases", "keywords", "hypothesis", "sentence_bleu",
                                  "sentence_chrf", *context}
            assert vd[c]["translation"] == clips[c] and isinstance(vd[c]["hypothesis"], str)
            h, r = vd[c]["hypothesis"], vd[c]["translation"]
            assert vd[c]["sentence_bleu"] == pytest.approx(sacrebleu.sentence_bleu(h, [r]).score)
            assert vd[c]["sentence_chrf"] == pytest.approx(sacrebleu.sentence_chrf(h, [r]).score)
    hyps = [out[v][c]["hypothesis"] for v in out for c in out[v]["clip_order"]]
    refs = [out[v][c]["translation"] for v in out for c in out[v]["clip_order"]]
    assert met["n"] == 6 and met["task"] == "translation"
    assert met["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert met["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert met["signature"].startswith("nrefs:1|") and "accuracy" not in met
    # the suite (tests/test_metrics.py checks each number against its library): BLEU-1..4, ROUGE-L, the
    # paraphrases as extra references (none here: the same as single-reference), intervals, breakdowns
    assert met["bleu4"] == met["bleu"] and {"bleu1", "bleu2", "bleu3", "rouge_l", "rouge_l_signature"} <= set(met)
    assert met["multiref_bleu"] == pytest.approx(met["bleu"]) and met["multiref_refs"] == 1.0
    assert met["ci95"]["n_bootstrap"] == 1000 and "bs:1000" in met["ci95"]["bleu"]["signature"]
    assert sorted(met["per_video"]) == ["vA", "vB"] and met["per_video"]["vA"]["n"] == 3
    assert sum(g["n"] for g in met["per_length"].values()) == 6
    # --limit: the first N clips in video / clip order
    out2, met2 = run_cli(env, tmp_path, "--limit", 2, "--num_beams", 1, "--max_new_tokens", 4, name="lim")
    assert met2["n"] == 2 and list(out2) == ["vA"] and out2["vA"]["clip_order"] == ["vA_0", "vA_1"]
    assert set(out2["vA"]) == {"clip_order", "vA_0", "vA_1"}


def test_yes_no_task_output(env, tmp_path):
    out, met = run_cli(env, tmp_path, "--task", "one_word_present", "--num_beams", 1, "--max_new_tokens", 4)
    entries = [out[v][c] for v in out for c in out[v]["clip_order"]]
    assert entries and all({"reference", "prompt", "hypothesis"} <= set(e) for e in entries)
    assert all(e["reference"] in ("yes", "no") and "Is the sign" in e["prompt"] for e in entries)
    ref = yes_no_metrics([e["hypothesis"] for e in entries], [e["reference"] for e in entries])
    for k in ("accuracy", "precision", "recall", "f1"):
        assert met[k] == pytest.approx(ref[k])


def test_metrics_equal_sacrebleu():
    import sacrebleu
    hyps = ["the cat sat on the mat", "a dog runs in a park", "hello there", ""]
    refs = ["the cat sat on a mat", "the dog runs in the park", "hello there friend", "nothing"]
    m = compute_metrics(hyps, refs)
    bleu = sacrebleu.corpus_bleu(hyps, [refs])
    assert m["bleu"] == pytest.approx(bleu.score) and m["n"] == 4
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    metric = sacrebleu.metrics.BLEU()
    metric.corpus_score(hyps, [refs])
    assert m["signature"] == str(metric.get_signature())
    # yes/no: answers aligned by position; 'yes' is the positive class
    y = yes_no_metrics(["yes", "no", "yes, yes", "Yes, no, no", "maybe"], ["yes", "yes", "no, yes", "yes, no, yes", "no"])
    # pairs: (y,y) (n,y) (y,n) (y,y) (y,y) (n,n) (n,y) (maybe,n) -> tp 3, fp 1, fn 2, correct 4 of 8
    assert y["accuracy"] == pytest.approx(4 / 8)
    assert y["precision"] == pytest.approx(3 / 4) and y["recall"] == pytest.approx(3 / 5)
    assert y["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert compute_metrics(["yes"], ["yes"], "one_word_present")["accuracy"] == 1.0


def read_features(data: Path, video: str, clip: str) -> dict[str, np.ndarray]:
    out = {}
    for m in DIMS:
        with h5py.File(data / m / f"{m}.dev.0.h5", "r") as h:
            out[m] = h[video][clip][()]
    return out


def test_api_matches_cli(env, tmp_path):
    out, _ = run_cli(env, tmp_path, "--context", "gold", "--num_beams", 3, "--max_new_tokens", 10, "--batch_size", 6)
    tr = Translator.from_checkpoint(env["ckpt"], device="cpu")
    n = 0
    for v, clips in VIDEOS.items():
        order = [c for c, *_ in clips]
        for pos, (c, _, _, _) in enumerate(clips):
            if c not in out[v]["clip_order"]:
                continue
            context = [t for _, _, t, _ in clips[:pos]]          # every preceding sentence; the windows pick
            hyp = tr.translate(read_features(env["data"], v, c), context=context, num_beams=3, max_new_tokens=10)
            assert hyp == out[v][c]["hypothesis"], (v, c, order)
            n += 1
    assert n == 6
    feats = read_features(env["data"], "vA", "vA_1")
    assert isinstance(tr.translate({"mae": feats["mae"]}, num_beams=1, max_new_tokens=4), str)   # a subset
    # torch tensors of any float dtype, with grad or not, as numpy arrays (numpy takes neither bf16 nor grad)
    as_numpy = tr.translate(feats, num_beams=1, max_new_tokens=6)
    as_tensors = {m: torch.tensor(a, dtype=torch.float32, requires_grad=True) for m, a in feats.items()}
    assert tr.translate(as_tensors, num_beams=1, max_new_tokens=6) == as_numpy
    bf16 = {m: torch.tensor(a).to(torch.bfloat16) for m, a in feats.items()}
    assert tr.translate({m: t.float().numpy() for m, t in bf16.items()}, num_beams=1, max_new_tokens=6) == \
        tr.translate(bf16, num_beams=1, max_new_tokens=6)
    with pytest.raises(ValueError, match="'depth'"):
        tr.translate({**feats, "depth": feats["mae"]})
    with pytest.raises(ValueError, match="'pose'.*\\[T, 4\\]"):
        tr.translate({"mae": feats["mae"], "pose": feats["mae"]})


def test_predicted_context_in_clip_order(env, tmp_path, monkeypatch):
    calls = []
    original = Translator.generate_items

    def spy(self, items, *a, **k):
        calls.append([(it["video"], it["clip"], it["prompt"]) for it in items])
        return original(self, items, *a, **k)

    monkeypatch.setattr(Translator, "generate_items", spy)
    out, met = run_cli(env, tmp_path, "--context", "predicted", "--num_beams", 2, "--max_new_tokens", 6,
                       "--batch_size", 8, "--num_workers", 2, name="pred")
    # rounds: the k-th clip of every video together, earlier rounds first
    assert [sorted(c for _, c, _ in call) for call in calls] == [["vA_0", "vB_0"], ["vA_1", "vB_1"], ["vA_3", "vB_2"]]
    hyp = {(v, c): out[v][c]["hypothesis"] for v in out for c in out[v]["clip_order"]}
    prompts = {(v, c): p for call in calls for v, c, p in call}
    for v, clips in VIDEOS.items():
        order = [c for c, *_ in clips]
        for pos, c in enumerate(order):
            if (v, c) not in hyp:
                continue
            ctx = [hyp.get((v, order[i]), "") for i in context_ids(pos, 1, 1)]    # window 1, prelude 1
            assert prompts[(v, c)] == translation_prompt([t for t in ctx if t]), (v, c)
    assert prompts[("vA", "vA_3")] == translation_prompt([t for t in [hyp[("vA", "vA_0")]] if t])   # vA_2 skipped
    assert met["context"] == "predicted"
    # FILE: the same hypotheses as context give the same prompts and outputs
    calls.clear()
    out2, _ = run_cli(env, tmp_path, "--context", tmp_path / "pred.json", "--num_beams", 2, "--max_new_tokens", 6,
                      name="file")
    assert {(v, c): p for call in calls for v, c, p in call} == prompts
    assert {(v, c): out2[v][c]["hypothesis"] for v in out2 for c in out2[v]["clip_order"]} == hyp


def test_default_context_and_score_only(env, tmp_path):
    """A checkpoint trained with a context window gets its own predicted context unless gold is asked for;
    --score_only re-scores an edited output without generating, keeping how it was made."""
    import sacrebleu
    out, met = run_cli(env, tmp_path, "--num_beams", 1, "--max_new_tokens", 6, name="dflt")
    assert met["context"] == "predicted" and (met["context_window"], met["prelude_window"]) == (1, 1)
    out["vA"]["vA_1"]["hypothesis"] = out["vA"]["vA_1"]["translation"]          # one clip made perfect
    path, met_path = tmp_path / "dflt.json", tmp_path / "dflt.metrics.json"
    path.write_text(json.dumps(out))
    assert generate.main(["--score_only", str(path), "--metrics_out", str(met_path)]) == 0
    rescored, met2 = json.loads(path.read_text()), json.loads(met_path.read_text())
    assert rescored["vA"]["vA_1"]["sentence_bleu"] == pytest.approx(100.0)
    hyps = [rescored[v][c]["hypothesis"] for v in rescored for c in rescored[v]["clip_order"]]
    refs = [rescored[v][c]["translation"] for v in rescored for c in rescored[v]["clip_order"]]
    assert met2["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score) and met2["bleu"] != met["bleu"]
    assert met2["context"] == "predicted" and met2["n"] == 6
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"vA": {"clip_order": ["vA_0"], "vA_0": {"translation": "x"}}}))
    assert generate.main(["--score_only", str(bad)]) == 2                      # one line, exit status 2


def test_bleurt_through_the_cli(env, tmp_path, capsys):
    """--bleurt PATH: BLEURT (signllava/bleurt.py) of every clip into the output, their mean into the metrics;
    a wrong path is one line and exit status 2 before anything is generated."""
    from signllava.bleurt import BleurtScorer
    from tests.test_metrics import make_tiny_bleurt
    texts = [tr for clips in VIDEOS.values() for _, _, tr, _ in clips]
    bleurt = make_tiny_bleurt(tmp_path / "bleurt", texts)
    out, met = run_cli(env, tmp_path, "--num_beams", 1, "--max_new_tokens", 4, "--bleurt", bleurt, name="bl")
    entries = [out[v][c] for v in out for c in out[v]["clip_order"]]
    expected = BleurtScorer.load(str(bleurt)).score([e["hypothesis"] for e in entries],
                                                    [e["translation"] for e in entries])
    assert [e["sentence_bleurt"] for e in entries] == pytest.approx(expected, abs=1e-6)
    assert met["bleurt"] == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    assert "RemBertForSequenceClassification" in met["bleurt_signature"]
    assert "BLEURT" in capsys.readouterr().out
    rc = generate.main(["--checkpoint", str(env["ckpt"]), "--data_dir", str(env["data"]), "--output",
                        str(tmp_path / "x.json"), "--device", "cpu", "--bleurt", str(tmp_path / "no-such-dir")])
    assert rc == 2 and not (tmp_path / "x.json").exists()
    assert "--bleurt" in capsys.readouterr().err


def visible_rows(dom: str) -> list[str]:
    """Clip names of the report's rows that are not hidden."""
    import re
    rows = re.findall(r"<tr ([^>]*data-video=[^>]*)>(.*?)</tr>", dom, re.S)
    return [re.findall(r"<td>([^<]*)</td>", cells)[1] for attrs, cells in rows if "hidden" not in attrs]


def test_report_in_a_real_browser(env, tmp_path):
    """The HTML report as a person sees it: every clip there, worst first, the filters really filter."""
    report = tmp_path / "report.html"
    out, met = run_cli(env, tmp_path, "--context", "gold", "--num_beams", 2, "--max_new_tokens", 6,
                       "--report", report, name="rep")
    clips = [c for v in out for c in out[v]["clip_order"]]
    dom = chromium(tmp_path, report.as_uri(), "--dump-dom")
    shown = visible_rows(dom)
    assert sorted(shown) == sorted(clips) and f"showing {len(clips)} of {len(clips)} clips" in dom
    scores = [out[c.split("_")[0]][c]["sentence_bleu"] for c in shown]
    assert scores == sorted(scores)                                               # worst first
    assert f"{met['bleu']:.2f}" in dom and met["signature"] in dom and ">gold (window 1, prelude 1)<" in dom
    for shown_score in ("BLEU-1", "ROUGE-L", "BLEU multi-ref", f"μ {met['ci95']['bleu']['mean']:.2f}",
                        "by reference length", met["rouge_l_signature"]):
        assert shown_score in dom, shown_score
    assert "http://" not in dom.replace("http://www.w3.org", "") and "https://" not in dom   # nothing fetched
    # by video, by text (the filter state is in the address, as a person's bookmark would keep it)
    assert sorted(visible_rows(chromium(tmp_path, report.as_uri() + "#video=vB", "--dump-dom"))) == ["vB_0", "vB_1", "vB_2"]
    word = out["vA"]["vA_1"]["translation"].split()[0]
    hits = [c for v in out for c in out[v]["clip_order"]
            if word.lower() in " ".join([c, out[v][c]["translation"], out[v][c]["hypothesis"],
                                         *out[v][c].get("context", [])]).lower()]
    assert sorted(visible_rows(chromium(tmp_path, report.as_uri() + f"#q={word}", "--dump-dom"))) == sorted(hits)
    assert 0 < len(hits) < len(clips)
    shot = tmp_path / "shot.png"
    chromium(tmp_path, report.as_uri(), f"--screenshot={shot}", "--window-size=1200,800")
    from PIL import Image
    img = Image.open(shot).convert("L")
    assert img.size == (1200, 800) and len(set(img.getdata())) > 10              # a page was drawn, not a blank


def test_two_ranks_write_one_output_in_clip_order(env, tmp_path):
    """deepspeed --num_gpus 2 generate.py: each rank its videos, one output equal to the one-rank output."""
    from tests.kit import run_script
    common = ["--checkpoint", env["ckpt"], "--data_dir", env["data"], "--num_beams", 2, "--max_new_tokens", 6,
              "--batch_size", 1, "--num_workers", 0, "--device", "cpu"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert generate.main([*map(str, common), "--output", str(one)]) == 0
    run_script("generate.py", *common, "--output", two, "--metrics_out", tmp_path / "two.metrics.json",
               launcher=True, ranks=2)
    assert two.read_text() == one.read_text()
    assert json.loads((tmp_path / "two.metrics.json").read_text())["ranks"] == 2


def test_stage2_adapter_is_loaded(env, tmp_path):
    tr2, ref = stage2_translators(env, tmp_path / "s2")
    items = env["items"]
    got = tr2.generate_ids(items, 1, 8)
    assert got == [manual_greedy(ref, it, 8) for it in items]
    assert got != env["tr"].generate_ids(items, 1, 8)                           # the adapter changes the output
    assert tr2.generate_ids(items, 3, 8) == hf_generate_ids(tr2, items, 3, 8)    # LoRA: shared prefill == plain HF


def test_bad_checkpoint_exits_2(env, tmp_path, capsys):
    rc = generate.main(["--checkpoint", str(tmp_path / "nope"), "--data_dir", str(env["data"]),
                        "--output", str(tmp_path / "o.json"), "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "nope" in err[-1]


def test_dim_mismatch_exits_2_one_line(env, tmp_path):
    import shutil
    bad = env["root"] / "ckpt_baddim"
    if not bad.exists():
        shutil.copytree(env["ckpt"], bad)
        cfg = json.loads((bad / "config.json").read_text())
        cfg["dims"]["pose"] = 5
        (bad / "config.json").write_text(json.dumps(cfg))
    envvars = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(HERE / "generate.py"), "--checkpoint", str(bad), "--data_dir", str(env["data"]),
                        "--output", str(tmp_path / "o.json"), "--metrics_out", str(tmp_path / "m.json"), "--device", "cpu"],
                       capture_output=True, text=True, env=envvars, cwd=HERE, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "pose" in errors[0] and "data 4 vs checkpoint 5" in errors[0], r.stderr
    assert not (tmp_path / "o.json").exists()


def test_prompt_shared_cache_layer_matches_dynamic_layer():
    """Same keys/values as transformers' DynamicLayer through prefill, updates, beam reorders and growth."""
    from transformers.cache_utils import DynamicLayer

    from signllava.beam_cache import PromptSharedLayer
    g = torch.Generator().manual_seed(0)
    B, beams, H, L, D = 2, 3, 2, 5, 4
    k0, v0 = torch.randn(B, H, L, D, generator=g), torch.randn(B, H, L, D, generator=g)
    ref = DynamicLayer()
    ref.update(k0, v0)
    ref.batch_repeat_interleave(beams)
    ours = PromptSharedLayer(k0, v0, beams, new_tokens=2)          # too small on purpose: it must grow
    for step in range(5):
        k, v = torch.randn(B * beams, H, 1, D, generator=g), torch.randn(B * beams, H, 1, D, generator=g)
        rk, rv = ref.update(k, v)
        ok, ov = ours.update(k, v)
        assert torch.equal(rk, ok) and torch.equal(rv, ov) and ours.get_seq_length() == L + step + 1
        # a beam reorder within each clip, as beam search makes
        idx = torch.cat([b * beams + torch.randint(beams, (beams,), generator=g) for b in range(B)])
        ref.reorder_cache(idx)
        ours.reorder_cache(idx)
        assert torch.equal(ref.keys, ours.keys) and torch.equal(ref.values, ours.values)


@pytest.mark.parametrize("num_beams,max_new", [(1, 10), (3, 10), (5, 12)])
def test_static_decode_equals_growing_cache(env, num_beams, max_new):
    """decode_graph.py's fixed-size cache and buffers (what the CUDA graph replays; on the CPU the same steps run
    eagerly) give the growing cache's tokens, batched (left padding: the mask) and one clip at a time (no mask)."""
    tr, items = env["tr"], env["items"]
    assert tr.decode_steps == "eager"                                                   # the default off the GPU
    ref = tr.generate_ids(items, num_beams, max_new)
    single = [tr.generate_ids([it], num_beams, max_new)[0] for it in items]
    tr.decode_steps = "static"
    try:
        assert tr.generate_ids(items, num_beams, max_new) == ref
        assert [tr.generate_ids([it], num_beams, max_new)[0] for it in items] == single
    finally:
        tr.decode_steps = "eager"
    assert "forward" not in base_causal_lm(tr.model.llm).__dict__                 # the model's forward restored
