"""One rank of the gathered-loss check, started by tests/test_clip.py through torchrun (gloo, CPU).

Ranks hold uneven blocks (4 and 2 rows) of one fixed batch. Each computes the gathered loss and its
gradients, and the single-process loss on the whole batch as reference, and writes both to JSON.
Only torch is imported (gather.py is loaded by path), so a rank starts in about a second.
"""

import importlib.util
import json
import os
import sys

import torch
import torch.distributed as dist

here = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("clip_gather", os.path.join(here, "..", "nso_hf", "clip", "gather.py"))
gather = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gather)

dist.init_process_group("gloo")
rank = dist.get_rank()
g = torch.Generator().manual_seed(0)
images = torch.nn.functional.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=-1)
texts = torch.nn.functional.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=-1)
block = slice(0, 4) if rank == 0 else slice(4, 6)

local_img = images[block].clone().requires_grad_(True)
local_txt = texts[block].clone().requires_grad_(True)
scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
loss = gather.gathered_contrastive_loss(local_img, local_txt, scale)
loss.backward()

ref_img = images.clone().requires_grad_(True)
ref_txt = texts.clone().requires_grad_(True)
ref_scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
ref = gather.contrastive_loss(ref_img, ref_txt, ref_scale)
ref.backward()

out = {
    "loss": loss.item(),
    "ref_loss": ref.item(),
    "grad_img": local_img.grad.tolist(),
    "ref_grad_img": ref_img.grad[block].tolist(),
    "grad_txt": local_txt.grad.tolist(),
    "ref_grad_txt": ref_txt.grad[block].tolist(),
    "grad_scale": scale.grad.item(),
    "ref_grad_scale": ref_scale.grad.item(),
}
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
