"""Reference for `harness bench train`: full fine-tuning of the same model in Hugging Face
transformers with torch.optim.AdamW, f32 weights and moments (as ours), on the same shapes.
Prints tokens/s and peak memory (RSS on the CPU, allocated GPU memory on a GPU).

    python benches/reference/hf_train.py MODEL [--shape 4x512] [--steps 3] [--device cpu|cuda] [--json]

MODEL is a GGUF file (dequantised to f32 by transformers; needs the gguf package) or a Hugging
Face folder (`harness model random --shape qwen2.5-0.5b --out DIR`).
"""
import argparse, json, os, resource, time

import torch
from transformers import AutoModelForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("--shape", default="4x512")
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--device", default="cpu")
parser.add_argument("--json", action="store_true")
args = parser.parse_args()
batch, length = map(int, args.shape.split("x"))
device = torch.device(args.device)

torch.manual_seed(0)
if os.path.isdir(args.model):
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32, attn_implementation="sdpa")
else:
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(args.model)), gguf_file=os.path.basename(args.model), torch_dtype=torch.float32
    )
model.to(device).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device)
labels = ids.clone()
labels[:, : length // 8] = -100  # a prompt share whose tokens carry no loss, as in SFT


def step():
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


step()  # warm-up: allocates the AdamW moments
if device.type == "cuda":
    torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(args.steps):
    step()
if device.type == "cuda":
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
tokens_per_second = batch * length * args.steps / seconds
if device.type == "cuda":
    peak_mib, where = torch.cuda.max_memory_allocated() / 2**20, "GPU allocated"
else:
    peak_mib, where = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "RSS"
if args.json:
    print(json.dumps({
        "engine": "transformers", "what": "train", "shape": args.shape, "precision": "f32 weights, f32 AdamW moments",
        "tokens_per_second": round(tokens_per_second, 1), "seconds_per_step": round(seconds / args.steps, 3),
        "peak_mib": round(peak_mib), "peak_of": where,
    }))
else:
    print(
        f"transformers {args.shape}: {tokens_per_second:.1f} tokens/s "
        f"({seconds / args.steps:.2f} s/step, {torch.get_num_threads()} threads), peak {where} {peak_mib:.0f} MiB"
    )
