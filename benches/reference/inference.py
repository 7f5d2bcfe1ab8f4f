"""What hf_score.py and hf_generate.py share: the model as both time it (seeded, sdpa
attention, evaluation mode) and a timer that waits for the GPU."""
import time

import torch
from transformers import AutoModelForCausalLM

DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


def add_model_args(parser):
    parser.add_argument("model", help="a Hugging Face folder")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))


def load(args):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=DTYPES[args.dtype], attn_implementation="sdpa")
    return model.to(torch.device(args.device)).eval()


def timed(device, run):
    """Seconds `run()` takes once it has run once (the warm-up), and the peak GPU MiB."""
    run()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = run()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return time.perf_counter() - start, peak, result
