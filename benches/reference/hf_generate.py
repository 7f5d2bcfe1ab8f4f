"""Reference for generation throughput on a GPU (issue 20): greedy `model.generate` at several
batch sizes, every row forced to `--new-tokens` (no early stop), bf16 with sdpa attention.
Prints one JSON line per batch size: new tokens/s and peak GPU memory.

    python3 benches/reference/hf_generate.py MODEL_DIR [--batches 1,16,64] [--prompt-len 180]
        [--new-tokens 64] [--device cuda] [--dtype bf16]
"""
import argparse, json

import torch

from inference import add_model_args, load, timed

parser = argparse.ArgumentParser()
add_model_args(parser)
parser.add_argument("--batches", default="1,16,64")
parser.add_argument("--prompt-len", type=int, default=180)
parser.add_argument("--new-tokens", type=int, default=64)
args = parser.parse_args()
model = load(args)
vocab = model.config.vocab_size


@torch.inference_mode()
def generate(batch):
    ids = torch.randint(0, vocab, (batch, args.prompt_len), device=model.device)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0,
    )
    return out.shape[1] - args.prompt_len


for batch in map(int, args.batches.split(",")):
    seconds, peak_mib, new = timed(args.device, lambda: generate(batch))
    print(json.dumps({
        "engine": "transformers", "what": "generate", "batch": batch, "prompt_len": args.prompt_len,
        "new_tokens_per_second": round(batch * new / seconds, 1), "seconds": round(seconds, 3),
        "peak_gpu_mib": peak_mib,
    }), flush=True)
