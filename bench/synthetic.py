"""Synthetic samples and models in real shapes, shared by the benchmark and the tests.

`Spec` says how long a clip is; `Synth` turns specs into the dicts SignDataset yields (the real prompt, random
features at the How2Sign dims, random answer ids), deterministic in (seed, index). `build_llm` makes a random
Llama of an 8B or tiny shape without a download; `quantize_4bit_` turns its linear layers into the nf4 layers
from_pretrained(BitsAndBytesConfig) would load; `assemble_with` runs model.assemble around an LLM in memory.
"""
from __future__ import annotations

import contextlib
import gc
import random
import time
from dataclasses import dataclass

import numpy as np
import torch


def log(msg: str):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
               rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096),
}
# How2Sign feature streams: dim, and the frame-rate divisor relative to T.
DIMS = {"mae": 768, "sign2vec": 768, "dino": 1152, "pose": 208}
FRAME_DIV = {"sign2vec": 2}
LORA = {"r": 64, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"}
WORDS = ("the a my your his her our their cat dog man woman child teacher friend brother sister mother father "
         "house school park garden street car bus train book coffee bread water apple morning night day week "
         "reads walks runs sleeps drinks eats sells buys makes takes gives sees likes loves wants needs opens "
         "big small old new hot cold warm long short happy quick slow every some many today then after before "
         "in on at with from to under over near and but because so very also again now here there sign hand "
         "video learn practice finger spell question answer yes no please thank you hello name what where").split()



# ------------------------------------------------------------------------------------------ samples
@dataclass
class Spec:
    frames: int          # T: frames of mae, dino, pose; sign2vec has T // FRAME_DIV
    answer: int          # answer tokens (the end-of-turn token comes on top)


def frame_counts(T: int, modalities=tuple(DIMS)) -> list[int]:
    return [max(1, T // FRAME_DIV.get(m, 1)) for m in modalities]


def make_specs(n: int, seed: int, frames=(50, 600), answer=(20, 80), dist: str = "loguniform") -> list[Spec]:
    rng = np.random.default_rng([seed, 11])
    lo, hi = frames
    if dist == "loguniform":
        T = np.exp(rng.uniform(np.log(lo), np.log(hi + 1), n)).astype(np.int64)
    elif dist == "uniform":
        T = rng.integers(lo, hi + 1, n)
    else:
        raise ValueError(f"--frames_dist must be loguniform or uniform, not {dist!r}")
    T = np.clip(T, lo, hi)
    A = rng.integers(answer[0], answer[1] + 1, n)
    return [Spec(int(t), int(a)) for t, a in zip(T, A)]


def make_tokenizer(seed: int = 0):
    """tiny_llm's byte-level BPE with Llama-3 special tokens and chat template, trained on random sentences."""
    from signllava.prompts import setup_special_tokens
    from signllava.demo import train_tokenizer
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "." for _ in range(300)]
    tok = train_tokenizer(texts)
    setup_special_tokens(tok)
    return tok


class Synth:
    """Dataset-like samples (the dict SignDataset.__getitem__ returns) from Specs, deterministic in (seed, i)."""

    def __init__(self, tokenizer, vocab_size: int, seed: int = 0, modalities=tuple(DIMS)):
        from signllava.prompts import PromptBuilder, special_ids, translation_prompt
        self.tok, self.vocab, self.seed, self.modalities = tokenizer, vocab_size, seed, list(modalities)
        self.ids = special_ids(tokenizer)
        self.builder = PromptBuilder(tokenizer, self.ids["markers"], self.ids["pad"])
        self.prompt = translation_prompt([])
        specials = [i for i in tokenizer.all_special_ids if i is not None] + list(self.ids["markers"]) + [self.ids["pad"], self.ids["eot"]]
        self.answer_lo = max(specials) + 1              # answer ids never hit a marker, pad or eot
        if max(specials) >= vocab_size or self.answer_lo >= vocab_size:
            raise ValueError(f"tokenizer special ids reach {max(specials)}, beyond the model vocabulary {vocab_size}")
        ids, _, _ = self.builder.build([1] * len(self.modalities), self.prompt, None)
        self.overhead = len(ids) - len(self.modalities)  # prompt tokens + 2 markers per modality, frames excluded

    def prompt_len(self, s: Spec) -> int:
        return self.overhead + sum(frame_counts(s.frames, self.modalities))

    def seq_len(self, s: Spec) -> int:
        """Real (unpadded) training tokens: prompt + frames + answer + end-of-turn."""
        return self.prompt_len(s) + s.answer + 1

    @staticmethod
    def approx_length(s: Spec, modalities=tuple(DIMS)) -> int:
        """SignDataset.length's formula (frames + 2 per modality + text), the key of length grouping."""
        return sum(f + 2 for f in frame_counts(s.frames, modalities)) + s.answer

    def features(self, i: int, s: Spec) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, 1, i])
        return [rng.standard_normal((t, DIMS[m]), dtype=np.float32).astype(np.float16)
                for m, t in zip(self.modalities, frame_counts(s.frames, self.modalities))]

    def answer_ids(self, i: int, s: Spec) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 2, i])
        return rng.integers(self.answer_lo, self.vocab, s.answer)

    def item(self, i: int, s: Spec, generation: bool = False) -> dict:
        feats = self.features(i, s)
        ids, labels, seg = self.builder.build([len(f) for f in feats], self.prompt, None)
        if not generation:
            ans = np.concatenate([self.answer_ids(i, s), [self.ids["eot"]]]).astype(np.int64)
            ids = np.concatenate([ids, ans])
            labels = np.concatenate([labels, ans])
            seg = np.concatenate([seg, np.full(len(ans), -1, dtype=seg.dtype)])
        ids = np.minimum(ids, self.vocab - 1)           # ids come from the tiny tokenizer: always < vocab
        return {"input_ids": ids, "labels": labels, "segments": seg, "features": feats,
                "modalities": self.modalities, "video": f"v{i}", "clip": f"c{i}", "task": "translation",
                "prompt": self.prompt, "answer": None if generation else "<random ids>"}


def collate(synth: Synth, specs: list[Spec], batch: list[int], padding_side: str = "right", pin: bool = False,
            generation: bool = False) -> dict:
    from data import Collator
    out = Collator(synth.ids["pad"], padding_side)([synth.item(i, specs[i], generation) for i in batch])
    if pin:
        out = {k: ({m: t.pin_memory() for m, t in v.items()} if isinstance(v, dict) else
                   v.pin_memory() if torch.is_tensor(v) else v) for k, v in out.items()}
    return out


# ------------------------------------------------------------------------------------------ model
def llama_config(shape: str):
    from transformers import LlamaConfig
    return LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None)


def packed_layer_inputs(cfg, tokens: int, device: torch.device, dtype: torch.dtype, samples: int = 10):
    """What one bare decoder layer of `cfg` is called with on a packed row of `tokens` positions, `samples`
    equal samples (the last takes the rest): (hidden states [1, tokens, H], position ids, RoPE's (cos, sin),
    the packed attention's keyword arguments). For the layer diagnostics (bench/fp8_layer.py, profile_step.py)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    lens = [tokens // samples] * (samples - 1) + [tokens - (samples - 1) * (tokens // samples)]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    pos = torch.cat([torch.arange(n, device=device) for n in lens])[None]
    x = torch.randn(1, tokens, cfg.hidden_size, device=device, dtype=dtype)
    pe = LlamaRotaryEmbedding(cfg).to(device)(x, pos)
    return x, pos, pe, dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens))


def build_llm(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random-init LlamaForCausalLM of the shape, created directly on `device` in `dtype` (no download,
    no 16 GB of host memory)."""
    from transformers import LlamaForCausalLM
    cfg = llama_config(shape)
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            llm = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    llm.config.dtype = dtype
    return llm.eval()


def _bnb_config(dtype: torch.dtype):
    """model.load_llm's quantisation config (zero3 off)."""
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)


def quantize_4bit_(llm, device: torch.device, dtype: torch.dtype, method: str = "auto") -> int:
    """In place: what from_pretrained(quantization_config=model.load_llm's BitsAndBytesConfig) builds, from
    weights already in memory (no 16 GB save + reload). method "hf": transformers' own bnb quantizer
    (replace every nn.Linear but lm_head by bnb Linear4bit, then Params4bit(value, **meta).to(device) per
    weight, as its Bnb4bitQuantize op does); "manual": the same modules built directly, for transformers
    versions whose quantizer internals differ; "auto": hf, else manual. Either way the model is marked
    4-bit the way the quantizer marks it, so peft picks its bnb LoRA layers. Returns the layers quantised."""
    if method in ("auto", "hf"):
        try:
            n = _quantize_hf(llm, device, dtype)
            llm._bench_quantizer = "hf"
            return n
        except Exception as e:       # noqa: BLE001
            if method == "hf" or any(p.device.type == "meta" for p in llm.parameters()):
                raise                # half-converted: nothing to fall back on
            log(f"transformers' quantizer path failed ({e.__class__.__name__}: {str(e)[:120]}); quantising manually")
    n = _quantize_manual(llm, device, dtype)
    llm._bench_quantizer = "manual"
    return n


def _quantize_hf(llm, device, dtype) -> int:
    import bitsandbytes as bnb
    from torch import nn
    from transformers.quantizers.auto import AutoHfQuantizer
    hq = AutoHfQuantizer.from_config(_bnb_config(dtype), pre_quantized=False)
    old = {name: m.weight.data for name, m in llm.named_modules() if type(m) is nn.Linear}
    hq.preprocess_model(llm, device_map={"": device})
    n = 0
    for name, m in llm.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            value = old.pop(name)
            m.weight = bnb.nn.Params4bit(value, requires_grad=False, **m.weight.__dict__).to(device)
            del value
            n += 1
    del old
    if n == 0:
        raise RuntimeError("the quantizer replaced no linear layer")
    hq.postprocess_model(llm)
    llm.hf_quantizer = hq
    free_memory()
    return n


def _quantize_manual(llm, device, dtype) -> int:
    import bitsandbytes as bnb
    from torch import nn
    qc = _bnb_config(dtype)
    out_emb = llm.get_output_embeddings()
    names = [name for name, m in llm.named_modules() if type(m) is nn.Linear and m is not out_emb]
    for name in names:
        old = llm.get_submodule(name)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, old.bias is not None, compute_dtype=dtype,
                                compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8, device="meta")
        new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, compress_statistics=True,
                                       quant_type="nf4", quant_storage=torch.uint8, module=new).to(device)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data, requires_grad=False)
        new.requires_grad_(False)
        llm.set_submodule(name, new)
        del old
    llm.is_loaded_in_4bit = True
    llm.quantization_method = qc.quant_method
    llm.config.quantization_config = qc
    free_memory()
    return len(names)


def sign_config(stage: int, bits: int):
    from model import SignConfig
    return SignConfig(base_model="<in-memory random Llama>", tokenizer="<in-memory tiny BPE>", modalities=list(DIMS),
                      dims=dict(DIMS), projector_types={m: "mlp2x_gelu" for m in DIMS}, stage=stage, bits=bits,
                      lora=dict(LORA) if stage == 2 else None)


@contextlib.contextmanager
def patched_load_llm(llm):
    """model.assemble with its LLM loader returning `llm`: everything else (freezing, dropout, checkpointing,
    peft, SignLLM) is the real code path."""
    import model as M
    orig = M.load_llm
    M.load_llm = lambda name, bits, dtype, device, zero3=False: llm
    try:
        yield
    finally:
        M.load_llm = orig


def assemble_with(llm, cfg, tokenizer, device, dtype, adapter=None, gradient_checkpointing=False, fp8=False):
    from model import assemble
    with patched_load_llm(llm):
        return assemble(cfg, tokenizer, device, dtype, adapter=adapter, gradient_checkpointing=gradient_checkpointing,
                        fp8=fp8)


def base_llm(model):
    """The LlamaForCausalLM inside a SignLLM (under a PeftModel if there is one)."""
    llm = model.llm
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def set_gradient_checkpointing(model, on: bool):
    set_gradient_checkpointing_llm(base_llm(model), on)


def set_gradient_checkpointing_llm(llm, on: bool):
    if on:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        llm.gradient_checkpointing_disable()


def cast_params_(model, dtype: torch.dtype):
    """DeepSpeed's bf16 mode: floating-point parameters to bf16, buffers (rotary inv_freq) kept."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def make_optimizer(model, lr: float, device: torch.device):
    from training import param_groups
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, 0.0, lr), lr=lr, betas=(0.9, 0.999), eps=1e-8, **kw)
