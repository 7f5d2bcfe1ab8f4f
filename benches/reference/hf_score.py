"""Reference for scoring throughput on a GPU (issue 20): what `harness bench forward` does,
in transformers: a forward pass over B x T tokens and the log-softmax at each next token,
in bf16 with sdpa attention. Prints one JSON line per shape: tokens/s, model FLOP utilisation
and peak GPU memory.

    python3 benches/reference/hf_score.py MODEL_DIR [--shapes 8x512,2x2048] [--iterations 3]
        [--device cuda] [--dtype bf16] [--peak-tflops 989]

MODEL_DIR is a Hugging Face folder (`harness model random --shape llama-3.1-8b --out DIR`).
"""
import argparse, json

import torch

from inference import add_model_args, load, timed

parser = argparse.ArgumentParser()
add_model_args(parser)
parser.add_argument("--shapes", default="8x512,2x2048")
parser.add_argument("--iterations", type=int, default=3)
parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM)")
args = parser.parse_args()
model = load(args)
cfg = model.config
params = sum(p.numel() for p in model.parameters())
embedding = model.get_input_embeddings().weight.numel()


def flops_per_token(length):
    # 2 FLOPs a weight (the embedding lookup is free), plus attention's two products over the
    # causal half of the keys: the count `harness bench forward` uses.
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * (length / 2)
    tied_head = 2 * embedding if getattr(cfg, "tie_word_embeddings", False) else 0
    return 2 * (params - embedding) + tied_head + attention


@torch.inference_mode()
def score(ids):
    logits = model(input_ids=ids).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    return logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).sum()


for shape in args.shapes.split(","):
    batch, length = map(int, shape.split("x"))
    ids = torch.randint(0, cfg.vocab_size, (batch, length), device=model.device)
    seconds, peak_mib, _ = timed(args.device, lambda: [score(ids) for _ in range(args.iterations)])
    tokens_per_second = batch * length * args.iterations / seconds
    tflops = tokens_per_second * flops_per_token(length) / 1e12
    print(json.dumps({
        "engine": "transformers", "what": "score", "shape": shape, "dtype": args.dtype,
        "tokens_per_second": round(tokens_per_second, 1), "tflops": round(tflops, 2),
        "mfu": round(tflops / args.peak_tflops, 4), "peak_gpu_mib": peak_mib, "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu",
    }), flush=True)
