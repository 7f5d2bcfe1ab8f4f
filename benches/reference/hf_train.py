"""Reference for `harness bench train`: full fine-tuning of the same model in Hugging Face
transformers with torch.optim.AdamW, f32, on the same shapes. Prints tokens/s and peak RSS.

    python benches/reference/hf_train.py GGUF_FILE [--shape 4x512] [--steps 3]

Needs torch, transformers and gguf (pip); the GGUF is dequantised to f32 by transformers.
"""
import argparse, os, resource, time

import torch
from transformers import AutoModelForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("gguf")
parser.add_argument("--shape", default="4x512")
parser.add_argument("--steps", type=int, default=3)
args = parser.parse_args()
batch, length = map(int, args.shape.split("x"))

torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(
    os.path.dirname(os.path.abspath(args.gguf)), gguf_file=os.path.basename(args.gguf), torch_dtype=torch.float32
)
model.train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
ids = torch.randint(0, model.config.vocab_size, (batch, length))
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
start = time.perf_counter()
for _ in range(args.steps):
    step()
seconds = time.perf_counter() - start
peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(
    f"transformers {args.shape}: {batch * length * args.steps / seconds:.1f} tokens/s "
    f"({seconds / args.steps:.2f} s/step, {torch.get_num_threads()} threads), peak RSS {peak_mib:.0f} MiB"
)
