"""Train a tiny Llama with HiRA for a few steps, with DeepSpeed ZeRO-3 (gloo, CPU) or without DeepSpeed.

Usage:
    torchrun --nproc_per_node N tests/scripts/zero3_train.py --mode zero3 --out losses.json
    python tests/scripts/zero3_train.py --mode plain --world N --out losses.json

The plain run processes the concatenation of the N per-rank micro-batches in one batch: with equal-length
sequences and the mean loss, its gradient equals ZeRO-3's averaged gradient, so the losses must match.
"""

import argparse
import json

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["zero3", "plain"], required=True)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", required=True)
    ap.add_argument("--variant", default="hira", choices=["hira", "sb"], help="sb: HiRA-SB with sb_init before step 0")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    import hira
    from hira.models import resolve_model

    path = resolve_model("tiny-llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(
        model,
        hira.HiraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], variant=args.variant),
    )
    per_rank, seq = 2, 12
    world = args.world
    data = torch.randint(3, 32000, (args.steps, world * per_rank, seq), generator=torch.Generator().manual_seed(7))
    lr = 0.05

    losses = []
    def sb_batches(rank, world_here):
        # the gradient estimate sees the first two steps' data (each rank its own slice under ZeRO-3)
        return [{"input_ids": data[i, rank * per_rank * world // world_here : (rank + 1) * per_rank * world // world_here],
                 "labels": data[i, rank * per_rank * world // world_here : (rank + 1) * per_rank * world // world_here]}
                for i in range(2)]

    if args.mode == "plain":
        if args.variant == "sb":
            hira.sb_init(model, sb_batches(0, 1), progress=False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        for step in range(args.steps):
            ids = data[step]
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        partitioned = None
        with torch.no_grad():
            ids = data[0]
            with model.disable_adapter():
                base_loss = model(ids, labels=ids).loss.item()
            model.merge_adapter()
            merged_loss = model(ids, labels=ids).loss.item()
        gathered = {}
    else:
        import deepspeed
        import torch.distributed as dist

        deepspeed.init_distributed(dist_backend="gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        assert world == args.world
        config = {
            "train_micro_batch_size_per_gpu": per_rank,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {
                "stage": 3,
                "stage3_param_persistence_threshold": 0,  # partition even the tiny test weights
                "stage3_max_live_parameters": 0,
                "stage3_prefetch_bucket_size": 0,
            },
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,
        }
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        if args.variant == "sb":
            hira.sb_init(engine.module, sb_batches(rank, world), progress=False)
        # Every weight, base and adapter, is really partitioned outside forward/backward.
        params = list(engine.module.named_parameters())
        partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for _, p in params)
        for step in range(args.steps):
            ids = data[step, rank * per_rank : (rank + 1) * per_rank]
            loss = engine(ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            t = loss.detach().clone()
            dist.all_reduce(t)
            losses.append((t / world).item())
        # Merge on the engine after training (the tuner gathers W0 and the factors: outside the engine's own
        # forward DeepSpeed does not), then the loss of the full first batch on every rank.
        from hira import _zero3

        base_loss = None
        _zero3.gathered.clear()
        with torch.no_grad():
            engine.module.merge_adapter()
            gathered = dict(_zero3.gathered)
            ids = data[0]
            merged_loss = engine(ids, labels=ids).loss.item()
        if rank != 0:
            return
    with open(args.out, "w") as f:
        json.dump({"losses": losses, "partitioned": partitioned, "merged_loss": merged_loss, "gathered": gathered,
                   "base_loss": base_loss if args.mode == "plain" else None}, f)


if __name__ == "__main__":
    main()
