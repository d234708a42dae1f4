"""Materialise what a real stage-2 run needs, without downloads: a random-init Llama-3-8B-shaped model
(bf16) saved as a local HF directory with the tiny Llama-3-style tokenizer, and a How2Sign-sized dataset
in the real layout (all four modalities at their real dims, `--frames` per clip).

    python bench/prepare_8b.py OUT [--shape 8b|tiny] [--train 400] [--dev 32] [--frames 150,400]

Then `deepspeed pretrain.py --model OUT/llm --data_dir OUT/data ...` and `deepspeed finetune.py ...`
run the real scripts on it (see bench/README.md).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import benchmark as bench


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--shape", default="8b", choices=sorted(bench.SHAPES))
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--dev", type=int, default=32)
    p.add_argument("--frames", default="150,400", help="min,max frames per clip (uniform)")
    args = p.parse_args()
    out = Path(args.out)
    lo, hi = map(int, args.frames.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t = time.time()
    tok = bench.make_tokenizer()
    llm = bench.build_llm(args.shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    llm.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|eot_id|>")
    llm.save_pretrained(out / "llm")      # in place: the benchmark's own output folder (bench/real_scripts.sh OUT)
    tok.save_pretrained(out / "llm")
    del llm
    print(f"model written in {time.time() - t:.0f} s", flush=True)
    synth = bench.Synth(tok, bench.SHAPES[args.shape]["vocab_size"])
    for split, n, seed in (("train", args.train, 0), ("dev", args.dev, 1)):
        specs = bench.make_specs(n, seed, frames=(lo, hi), dist="uniform")
        bench.write_dataset(out / "data", synth, specs, split=split)
    print(f"model + data ready in {time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
