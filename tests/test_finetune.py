"""Stage 2 on CPU: 4-bit QLoRA under ZeRO-2 and ZeRO-3, the PEFT adapter, --projector in every accepted
form (including the original's DeepSpeed file), loading errors, exact resume, the LoRA merge export."""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.kit import build_tiny_llm, run_script, script_env, train_args, write_tiny_dataset


@pytest.fixture(scope="module")
def s1(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    data = write_tiny_dataset(root / "data")
    llm = build_tiny_llm(root / "llm", data)
    out = root / "stage1"
    run_script("pretrain.py", *train_args(data, llm, out, 4, "--save_steps", 4))
    return root, data, llm, out


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def finetune(s1, name, steps, *extra, zero=2, env=None, check=True):
    root, data, llm, stage1 = s1
    out = root / name
    res = run_script("finetune.py", "--projector", stage1, *train_args(data, llm, out, steps, zero=zero), *extra,
                     env=env, check=check)
    return out, res


def frozen_keys(keys) -> list[str]:
    """Saved keys that would be frozen base weights (bnb quant-state metadata is allowed, packed weights are not)."""
    ok = ("projectors.", "marker_embed.")
    meta = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state")
    return [k for k in keys if not k.startswith(ok) and "lora_" not in k and not any(m in k for m in meta)]


def test_qlora_zero2_learns_and_saves_only_trainables(s1):
    out, _ = finetune(s1, "z2", 12, "--save_steps", 6)
    l = losses(out)
    assert sum(l[-3:]) / 3 < sum(l[:3]) / 3, l
    ck = out / "checkpoint-12"
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["stage"] == 2 and cfg["bits"] == 4 and cfg["lora"]["r"] == 64 and cfg["lora"]["lora_alpha"] == 16
    assert (ck / "adapter" / "adapter_config.json").is_file()
    module = torch.load(ck / "deepspeed" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    assert not frozen_keys(module), frozen_keys(module)
    adapter = load_file(str(ck / "adapter" / "adapter_model.safetensors"))
    targets = {k.split(".")[-3] for k in adapter}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_adapter_loads_with_peft_and_gives_same_logits(s1):
    """The PEFT directory, loaded by peft's own PeftModel.from_pretrained, reproduces the trained model
    (as held in the DeepSpeed state) exactly."""
    from peft import PeftModel
    from data import Collator, DataOptions, SignDataset
    from model import SignConfig, SignLLM, assemble, load_llm, load_tokenizer, read_projector_file
    from signllava.prompts import PromptBuilder, special_ids
    root, data, llm, _ = s1
    ck = root / "z2" / "checkpoint-12"
    if not ck.exists():
        pytest.skip("needs test_qlora_zero2_learns_and_saves_only_trainables")
    cfg = SignConfig.load(ck)
    tok, _ = load_tokenizer(cfg.tokenizer)
    cpu = torch.device("cpu")
    trained = assemble(cfg, tok, cpu, torch.float32, adapter="new")
    module = torch.load(ck / "deepspeed" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert trainable <= set(module)                                     # every trained tensor is in the state
    trained.load_state_dict({k: module[k] for k in trainable}, strict=False)
    base = load_llm(cfg.base_model, 4, torch.float32, cpu)
    via_peft = SignLLM(PeftModel.from_pretrained(base, str(ck / "adapter")), cfg, special_ids(tok)["markers"])
    via_peft.load_projector_state(read_projector_file(ck / "projectors.safetensors"), "test")
    ids = special_ids(tok)
    ds = SignDataset(data, "dev", PromptBuilder(tok, ids["markers"], ids["pad"]), DataOptions(), train=False)
    batch = Collator(ids["pad"])([ds[i] for i in range(3)])
    logits = []
    for m in (trained, via_peft):
        m.eval()
        with torch.no_grad():
            emb = m.embed(batch["input_ids"], batch["features"], batch["frame_index"])
            logits.append(m.llm(inputs_embeds=emb, attention_mask=batch["attention_mask"]).logits)
    assert torch.allclose(logits[0], logits[1], atol=1e-5), (logits[0] - logits[1]).abs().max()


def test_qlora_zero3(s1):
    out, _ = finetune(s1, "z3", 6, "--save_steps", 6, zero=3)
    l = losses(out)
    assert l[-1] < l[0], l
    adapter = load_file(str(out / "checkpoint-6" / "adapter" / "adapter_model.safetensors"))
    assert all(v.numel() > 0 for v in adapter.values())                 # gathered, not ZeRO-3 placeholders


def reference_file(stage1_ckpt: Path, path: Path, vocab: int) -> Path:
    """A file in the original's layout: DeepSpeed `module` dict with model.<m>_projector.* keys and the
    full embed_tokens matrix whose last two rows are <video_start>/<video_end>."""
    ours = load_file(str(stage1_ckpt / "projectors.safetensors"))
    module = {f"model.{k.split('.')[1]}_projector.{'.'.join(k.split('.')[2:])}": v
              for k, v in ours.items() if k.startswith("projectors.")}
    hidden = ours["marker_embed.weight"].shape[1]
    module["model.embed_tokens.weight"] = torch.cat([torch.randn(vocab, hidden), ours["marker_embed.weight"]])
    torch.save({"module": module, "buffer_names": []}, path)
    return path


def test_projector_forms(s1):
    from finetune import read_projector_source
    root, data, llm, stage1 = s1
    ck = stage1 / "checkpoint-4"
    ref = reference_file(ck, root / "mp_rank_00_model_states.pt", vocab=100)
    expected = load_file(str(ck / "projectors.safetensors"))
    # The original's file holds projectors and the two marker rows, not our per-modality and absent rows.
    original = {k for k in expected if not k.startswith(("marker_embed.modality.", "marker_embed.absent."))}
    for form in (stage1, ck, ck / "projectors.safetensors", ref):
        cfg, state, _ = read_projector_source(str(form))
        keys = original if form == ref else set(expected)
        assert set(state) == keys, form
        assert all(torch.equal(state[k], expected[k]) for k in keys), form
        assert (cfg is None) == (form == ref)
    # End to end from the reference file: with lr 0 the projectors come out exactly as they went in.
    out2 = root / "from_ref_pt"
    res = run_script("finetune.py", "--projector", ref, *train_args(data, llm, out2, 1, "--learning_rate", 0, "--save_steps", 1))
    assert "mp_rank_00_model_states.pt" in res.stderr
    got = load_file(str(out2 / "checkpoint-1" / "projectors.safetensors"))
    assert all(torch.equal(got[k], expected[k]) for k in original)
    assert not got["marker_embed.modality.weight"].any()       # rows the original lacks start from their init


def test_pickled_payload_is_refused_and_never_runs(s1, tmp_path):
    """The original's model-states file loads; the same file carrying an object whose unpickling runs a
    command is refused with one line naming the file and the callable, and the command never runs."""
    import pickle
    from model import CheckpointError, read_reference_states
    from tests.kit import Payload
    root, data, llm, stage1 = s1
    good = reference_file(stage1 / "checkpoint-4", tmp_path / "mp_rank_00_model_states.pt", vocab=100)
    assert any(k.startswith("projectors.") for k in read_reference_states(good))
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(Payload(live)))            # the payload is real: a plain unpickler runs it
    assert live.exists()
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad" / "mp_rank_00_model_states.pt"
    bad.parent.mkdir()
    raw = torch.load(good, map_location="cpu", weights_only=True)
    torch.save({**raw, "client_state": Payload(marker)}, bad)
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt: needs posix.system to load"):
        read_reference_states(bad)
    res = run_script("finetune.py", "--projector", bad, *train_args(data, llm, root / "ft_payload", 1), check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith(f"error: {bad}: needs posix.system") and "refused" in err, err
    assert not marker.exists()


def test_unreadable_pt_file_is_one_line(tmp_path):
    from signllava import safe_load
    from signllava.errors import CheckpointError
    whole = tmp_path / "whole.pt"
    torch.save({"step": 3, "w": torch.ones(1000)}, whole)
    assert safe_load.load(whole)["step"] == 3
    cut, text = tmp_path / "cut.pt", tmp_path / "text.pt"
    cut.write_bytes(whole.read_bytes()[:2000])
    text.write_text("not a checkpoint")
    for bad in (cut, text, tmp_path / "missing.pt"):
        with pytest.raises(CheckpointError, match=rf"^{bad}: (unreadable torch file|not found|refused)") as err:
            safe_load.load(bad)
        assert "\n" not in str(err.value)


def test_misshaped_projector_file_names_the_key(s1):
    root, data, llm, stage1 = s1
    state = load_file(str(stage1 / "checkpoint-4" / "projectors.safetensors"))
    state["projectors.mae.0.weight"] = torch.zeros(64, 5)
    del state["projectors.pose.2.bias"]
    bad = root / "bad" / "projectors.safetensors"
    bad.parent.mkdir()
    save_file(state, str(bad))
    res = run_script("finetune.py", "--projector", bad, *train_args(data, llm, root / "ft_bad", 1), check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    err = res.stderr.strip().splitlines()[-1]
    assert "projectors.mae.0.weight (64, 5) (model (64, 12))" in err and "missing: projectors.pose.2.bias" in err, err


def test_adapter_that_does_not_fit_is_an_error_listing_keys(s1, tmp_path):
    import shutil
    from model import CheckpointError, SignConfig, assemble, load_tokenizer
    root = s1[0]
    ck = root / "z2" / "checkpoint-12"
    if not ck.exists():
        pytest.skip("needs test_qlora_zero2_learns_and_saves_only_trainables")
    cfg = SignConfig.load(ck)
    tok, _ = load_tokenizer(cfg.tokenizer)
    bad = tmp_path / "adapter"
    shutil.copytree(ck / "adapter", bad)
    state = load_file(str(bad / "adapter_model.safetensors"))
    gone = sorted(state)[0]
    del state[gone]
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(2, 2)
    save_file(state, str(bad / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        assemble(cfg, tok, torch.device("cpu"), torch.float32, adapter=str(bad))
    msg = str(err.value)
    assert "adapter_model.safetensors" in msg and "lora_C" in msg and gone.replace(".weight", "") in msg, msg


def test_stage2_exact_resume_after_sigkill(s1):
    """LoRA dropout draws from the torch RNG: exact resume needs the RNG state restored too."""
    common = ("--save_steps", 3)
    ref, _ = finetune(s1, "res_ref", 6, *common)
    out, res = finetune(s1, "res_kill", 6, *common, env=script_env(SIGNLLAVA_FAULT="after_save:3"), check=False)
    assert res.returncode == -9 and (out / "latest").read_text().strip() == "checkpoint-3"
    finetune(s1, "res_kill", 6, *common, "--resume")
    for rel in ("projectors.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(ref / "checkpoint-6" / rel)), load_file(str(out / "checkpoint-6" / rel))
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5, rel


def test_bits16_lora_and_merged_export_match(s1):
    from model import SignConfig
    root, data, llm, _ = s1
    out, _ = finetune(s1, "b16", 4, "--bits", "16", "--save_steps", 4)
    assert SignConfig.load(out / "checkpoint-4").bits == 16
    from signllava.scoring import compute_metrics
    metrics = root / "test.metrics.json"
    metrics.write_text(json.dumps({**compute_metrics(["a red cat"], ["a red dog"], n_bootstrap=10), "split": "test"}))
    run_script("export.py", "--checkpoint", out, "--output_dir", root / "merged", "--dtype", "fp32",
               "--metrics", metrics)
    # the folder is ready for `huggingface-cli upload`: a model card huggingface_hub reads, naming the real run
    from huggingface_hub import ModelCard
    for where, adapter in ((root / "merged", False), (out, True)):      # export.py's and the finished run's
        card = ModelCard.load(where / "README.md")
        assert "sign-language-translation" in card.data.tags and card.data.license == "other"
        assert f"`{llm}`" in card.text and "## Training recipe" in card.text and "## Limitations" in card.text
        assert "lora_r:" in card.text and "was not found" not in card.text      # stage 2's and stage 1's args
        assert ("PeftModel.from_pretrained" in card.text) == adapter
    merged_card = ModelCard.load(root / "merged" / "README.md")
    assert [r.metric_name for r in merged_card.data.eval_results][:2] == ["BLEU-4", "BLEU-1"]
    from generate import Translator
    import numpy as np
    a = Translator.from_checkpoint(out / "checkpoint-4", device="cpu")
    b = Translator.from_checkpoint(root / "merged", device="cpu")
    rng = np.random.default_rng(0)
    feats = {m: rng.normal(size=(6, d)).astype(np.float16) for m, d in a.cfg.dims.items()}
    assert a.translate(feats, num_beams=2, max_new_tokens=8) == b.translate(feats, num_beams=2, max_new_tokens=8)
    assert not (root / "merged" / "adapter").exists()


def test_demo_defaults_need_nothing_but_projector(tmp_path):
    """No --data_dir, no --model: the demo language and the embedded tiny Llama; stage 2 then needs only
    --projector (its base model, tokenizer and output dir come from the stage-1 run)."""
    s1 = tmp_path / "demo_s1"
    # --eval_generate 0: the one step's evaluation would otherwise translate all 154 dev clips (half the time)
    run_script("pretrain.py", "--output_dir", s1, "--max_steps", 1, "--num_workers", 0, "--eval_generate", 0)
    assert (s1 / "base_model" / "tokenizer.json").is_file() and (s1 / "demo_data" / "annotation.dev.json").is_file()
    run_script("finetune.py", "--projector", s1, "--max_steps", 1, "--num_workers", 0, "--eval_generate", 0)
    assert (tmp_path / "demo_s1-stage2" / "latest").read_text().strip() == "checkpoint-1"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
