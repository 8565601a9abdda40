"""One rank of tests/test_patch.py::test_ddp_gloo_matches_one_process (run by torchrun, 2 ranks, gloo).

argv: checkpoint dir, work dir holding adapters.pt and batch.pt; rank 0 writes ddp_result.pt there.
"""
import datetime
import sys

import peft
import torch
import torch.distributed as dist
import transformers

from qlora_kernels import patch_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(msg):
    print(f"[rank {dist.get_rank() if dist.is_initialized() else '?'}] {msg}", flush=True)


def main(checkpoint, work):
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))
    rank, world = dist.get_rank(), dist.get_world_size()
    log("initialized")
    bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=bnb_cfg,
                                                              device_map="cpu")
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                       target_modules=TARGETS))
    adapters = torch.load(f"{work}/adapters.pt")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(adapters[name])
    model.train()
    patch_model(model)
    log("model loaded and patched")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    log("DDP built")
    data = torch.load(f"{work}/batch.pt")
    ids, labels = data["ids"], data["labels"]
    n_items = (labels[:, 1:] != -100).sum()          # the whole batch's count, as Trainer gathers it
    rows = slice(rank * ids.shape[0] // world, (rank + 1) * ids.shape[0] // world)
    out = ddp(input_ids=ids[rows], labels=labels[rows], num_items_in_batch=n_items)
    log("forward done")
    (out.loss * world).backward()                    # DDP averages gradients over ranks
    log("backward done")
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    if rank == 0:
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": loss, "grads": grads}, f"{work}/ddp_result.pt")
    dist.barrier()
    log("done")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
