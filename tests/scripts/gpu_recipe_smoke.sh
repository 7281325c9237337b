#!/usr/bin/env bash
# GPU smoke run of the real pipeline: the commonsense recipe (its YAML: bf16, activation checkpointing, HiRA fused
# path) for 20 steps on a tiny Llama and a small synthetic LLM-Adapters BoolQ file, then eval/commonsense.py with
# 4-beam search on the merged adapter. Usage: bash tests/scripts/gpu_recipe_smoke.sh MODEL_DIR
set -euo pipefail
MODEL=${1:?usage: gpu_recipe_smoke.sh MODEL_DIR}
WORK=$(mktemp -d)
python3 - "$WORK" <<'PY'
import json, os, random, sys
rng = random.Random(0)
rows = []
for i in range(400):
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    label = "true" if a > b else "false"
    rows.append({"instruction": f"Please answer the following question with true or false, question: is {a} larger than {b}?\n\nAnswer format: true/false",
                 "input": "", "output": f"the correct answer is {label}", "answer": label})
os.makedirs(os.path.join(sys.argv[1], "boolq"))
json.dump(rows[:360], open(os.path.join(sys.argv[1], "boolq", "train.json"), "w"))
json.dump(rows[360:], open(os.path.join(sys.argv[1], "boolq", "test.json"), "w"))
PY
python3 recipes/commonsense.py --model_name_or_path "$MODEL" --dataset_name "$WORK/boolq" --val_size 0 \
    --eval_strategy no --load_best_model_at_end false --save_strategy no --max_steps 20 \
    --per_device_train_batch_size 8 --gradient_accumulation_steps 1 --hira_r 8 --warmup_steps 2 \
    --learning_rate 1e-2 --logging_steps 5 --output_dir "$WORK/out" --report_to none
python3 eval/commonsense.py --ckpt "$WORK/out" --data_dir "$WORK" --tasks boolq --num_beams 4 --max_new_tokens 8 \
    --batch_size 16 --out "$WORK/eval"
python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print('RUN_SUMMARY', {k: s[k] for k in ('trainable_params','steps','peak_memory_bytes','tokens_per_s','train_wall_time_s') if k in s}, [round(h['loss'],3) for h in s['log_history'] if 'loss' in h])" "$WORK/out/run_summary.json"
