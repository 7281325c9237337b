"""Time `hira.analysis`'s per-layer spectrum pass on a Llama-3-8B-shaped HiRA adapter (GPU).

    python bench/bench_analysis_gpu.py            # builds a random bf16 Llama-3-8B (no download), r=32 on q,k,v,up,down

It runs the same loop as ``python -m hira.analysis`` (``iter_adapter_deltas`` → ``spectrum_metrics``, one layer at a
time on the GPU) over all 160 adapted matrices and prints the wall time and the rank figures.
"""

import argparse
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import hira
    from hira.analysis import iter_adapter_deltas, spectrum_metrics

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=args.layers, vocab_size=128256)
    t = time.time()
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model = get_peft_model(model, hira.HiraConfig(r=32, target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "hira_B" in n:
                p.normal_(0, 0.02)
    torch.cuda.synchronize()
    print(f"built {sum(p.numel() for p in model.parameters())/1e9:.2f}B params in {time.time() - t:.1f}s", flush=True)
    t = time.time()
    ranks, n = [], 0
    for name, dW, W0, r in iter_adapter_deltas(model, device="cuda"):
        m = spectrum_metrics(dW)
        ranks.append(m["num_rank"])
        n += 1
    torch.cuda.synchronize()
    dt = time.time() - t
    print(f"analysed {n} adapted matrices in {dt:.1f}s ({dt / n:.2f}s each); numerical rank of ΔW min {min(ranks)} "
          f"max {max(ranks)} (r = 32); peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
