"""BLEURT (BLEURT-20 and its distilled -D3/-D6/-D12) in PyTorch, through transformers' own RemBERT classes.

Which implementation. PyPI's `bleurt-pytorch` 0.0.1 -- the PyTorch port whose checkpoints are the hub's
`lucadiliello/BLEURT-20`, `-D12`, `-D6`, `-D3` -- no longer imports with transformers 5
(`find_pruneable_heads_and_indices` left `transformers.pytorch_utils`), and Google's package is TensorFlow.
The port's model is, module for module, what transformers' `RemBertForSequenceClassification` computes:
word / position / segment embeddings of width `embedding_size` summed and layer-normed, one linear map up to
`hidden_size` (RemBERT's `embedding_hidden_mapping_in`, the port's `embedding_projection`), BERT's post-norm
encoder layers, BERT's tanh pooler on the first token, and one linear unit on top (the regression score).
RemBERT's decoupled output embeddings belong to its masked-LM head only, which the classifier does not have.
So a port checkpoint loads into that class with its tensors renamed and none changed, strictly: every tensor
is used and none is missing (the port's saved `position_ids` buffer aside).

Inputs follow BLEURT's own encoding: sentencepiece pieces of the reference and the candidate,
`[CLS] reference [SEP] candidate [SEP]` with segments 0 and 1, the longer side cut first when the pair exceeds
the length limit (512, the checkpoints' position table), padded on the right under an attention mask.

A checkpoint is a directory (or a hub id, fetched by huggingface_hub into its cache) holding config.json
(`model_type` "bleurt" as the port writes it, or "rembert"), model.safetensors or pytorch_model.bin (read
weights-only), and the sentencepiece model (spm.model; sent_piece.model as Google names it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch

from signllava.errors import CheckpointError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SPM_FILES = ("spm.model", "sent_piece.model")
# The port's config keys that differ from RemBertConfig's; the others (hidden_size, layers, heads, dropout,
# layer_norm_eps, vocab_size, max_position_embeddings, type_vocab_size, hidden_act, pad_token_id) agree.
CONFIG_RENAMES = {"embedding_size": "input_embedding_size"}
# Port tensor name prefix -> RemBERT's.
WEIGHT_RENAMES = (("bleurt.encoder.embedding_projection.", "rembert.encoder.embedding_hidden_mapping_in."),
                  ("bleurt.", "rembert."))
UNUSED_BUFFERS = ("bleurt.embeddings.position_ids", "rembert.embeddings.position_ids")


def resolve(path_or_id: str) -> Path:
    """The checkpoint directory: a local directory, else a hub id fetched (only the files used) into
    huggingface_hub's cache; HF_HUB_OFFLINE=1 reads that cache only."""
    p = Path(path_or_id)
    if p.is_dir():
        return p
    if p.exists() or path_or_id.count("/") != 1 or path_or_id.startswith((".", "/")):
        raise CheckpointError(f"--bleurt {path_or_id}: not a checkpoint directory nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(path_or_id, allow_patterns=["config.json", *WEIGHT_FILES, *SPM_FILES]))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"--bleurt {path_or_id}: cannot fetch it ({first})") from None


def rembert_config(raw: dict, where: Path):
    from transformers import RemBertConfig
    kind = raw.get("model_type")
    if kind not in ("bleurt", "rembert"):
        raise CheckpointError(f"{where}/config.json: model_type {kind!r}; a PyTorch BLEURT checkpoint has 'bleurt' "
                              "(bleurt-pytorch's layout) or 'rembert'")
    if kind == "bleurt" and raw.get("embedding_size") is None:
        raise CheckpointError(f"{where}/config.json: no embedding_size, so not a BLEURT-20 (RemBERT-based) "
                              "checkpoint; the BERT-based BLEURT checkpoints of 2020 are not supported")
    fields = {CONFIG_RENAMES.get(k, k): v for k, v in raw.items() if k not in ("model_type", "architectures")}
    fields.update(num_labels=1, classifier_dropout_prob=0.0)
    for unused in ("bos_token_id", "eos_token_id"):      # RemBERT's defaults name ids of its own vocabulary
        fields.setdefault(unused, None)
    return RemBertConfig(**fields)


def read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """RemBERT-named tensors of the checkpoint (safetensors, or a .bin read weights-only)."""
    for name in WEIGHT_FILES:
        f = ckpt / name
        if f.is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file
                state = load_file(str(f))
            else:
                from signllava.safe_load import load
                state = load(f)
            break
    else:
        raise CheckpointError(f"{ckpt}: no {' or '.join(WEIGHT_FILES)}")
    out = {}
    for k, v in state.items():
        if k in UNUSED_BUFFERS:
            continue
        for old, new in WEIGHT_RENAMES:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


@dataclass
class BleurtScorer:
    model: torch.nn.Module
    spm: object              # sentencepiece.SentencePieceProcessor
    special: dict[str, int]  # [CLS], [SEP], pad ids
    max_length: int
    signature: str

    @classmethod
    def load(cls, path_or_id: str, device: str | torch.device = "cpu") -> "BleurtScorer":
        import sentencepiece
        from transformers import RemBertForSequenceClassification
        ckpt = resolve(path_or_id)
        cfg_file = ckpt / "config.json"
        try:
            raw = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{cfg_file}: unreadable ({e})") from None
        config = rembert_config(raw, ckpt)
        model = RemBertForSequenceClassification(config)
        state = read_weights(ckpt)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:       # a shape that does not fit the config
            lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln] or [type(e).__name__]
            raise CheckpointError(f"{ckpt}: weights do not fit its config.json ({lines[0]})") from None
        if missing or unexpected:
            raise CheckpointError(f"{ckpt}: not a BLEURT regressor of its config.json (missing "
                                  f"{', '.join(missing[:3]) or 'none'}; unexpected {', '.join(unexpected[:3]) or 'none'})")
        spm_file = next((ckpt / n for n in SPM_FILES if (ckpt / n).is_file()), None)
        if spm_file is None:
            raise CheckpointError(f"{ckpt}: no sentencepiece model ({' or '.join(SPM_FILES)})")
        spm = sentencepiece.SentencePieceProcessor(model_file=str(spm_file))
        special = {t: spm.piece_to_id(t) for t in ("[CLS]", "[SEP]")}
        if any(spm.id_to_piece(i) != t for t, i in special.items()):
            raise CheckpointError(f"{spm_file}: has no [CLS] / [SEP] pieces (not a BLEURT vocabulary)")
        special["pad"] = config.pad_token_id or 0
        model.to(device).eval()
        signature = (f"BLEURT|checkpoint:{path_or_id}|layers:{config.num_hidden_layers}|hidden:{config.hidden_size}"
                     f"|impl:transformers-{version('transformers')}-RemBertForSequenceClassification")
        return cls(model, spm, special, config.max_position_embeddings, signature)

    def encode(self, candidate: str, reference: str) -> tuple[list[int], list[int]]:
        """(ids, segment ids) of one pair, BLEURT's layout; the longer side is cut first to fit."""
        ref, cand = self.spm.encode(reference), self.spm.encode(candidate)
        room = self.max_length - 3
        while len(ref) + len(cand) > room:
            (ref if len(ref) > len(cand) else cand).pop()
        cls_, sep = self.special["[CLS]"], self.special["[SEP]"]
        ids = [cls_, *ref, sep, *cand, sep]
        return ids, [0] * (len(ref) + 2) + [1] * (len(cand) + 1)

    @torch.inference_mode()
    def score(self, candidates: list[str], references: list[str], batch_size: int = 16) -> list[float]:
        """One BLEURT score per (candidate, reference) pair, in order."""
        device = next(self.model.parameters()).device
        out: list[float] = []
        for k in range(0, len(candidates), batch_size):
            pairs = [self.encode(c, r) for c, r in zip(candidates[k:k + batch_size], references[k:k + batch_size])]
            width = max(len(ids) for ids, _ in pairs)
            ids = torch.full((len(pairs), width), self.special["pad"], dtype=torch.long)
            seg = torch.zeros_like(ids)
            mask = torch.zeros_like(ids)
            for row, (i, s) in enumerate(pairs):
                ids[row, :len(i)], seg[row, :len(s)], mask[row, :len(i)] = torch.tensor(i), torch.tensor(s), 1
            logits = self.model(input_ids=ids.to(device), token_type_ids=seg.to(device),
                                attention_mask=mask.to(device)).logits
            out += logits[:, 0].float().tolist()
        return out
