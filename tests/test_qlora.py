"""QLoRA: a 4-bit bitsandbytes base with LoRA adapters. Only the adapters are perturbed; the packed
4-bit weights are never touched (they are frozen and not floating point), sigma = 0 equals Trainer,
and a step at sigma > 0 puts the adapters back bit for bit."""

from __future__ import annotations

import pytest
import torch

from nso_hf import NSOConfig, NSOTrainer

from conftest import first_batch, lm_examples, params_of, tiny_llama, training_args

pytestmark = pytest.mark.slow  # `make test-slow` installs bitsandbytes


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_llama(dropout=0.1).save_pretrained(path)
    return str(path)


def qlora(base_dir: str):
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=quant, device_map="cpu")
    base.config._attn_implementation = "eager"
    torch.manual_seed(0)  # the same adapters every time
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    return model


def packed(model) -> dict[str, torch.Tensor]:
    """The 4-bit base weights as stored (uint8 packs), copied."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}


def test_qlora_perturbs_adapters_only_and_reproduces_trainer(base_dir, tmp_path, one_thread):
    from transformers import Trainer

    args = training_args(tmp_path, max_steps=2, learning_rate=1e-2)
    ref = qlora(base_dir)
    Trainer(model=ref, args=args, train_dataset=lm_examples()).train()
    got = qlora(base_dir)
    four_bit = packed(got)
    assert four_bit  # the base really is 4-bit
    trainer = NSOTrainer(model=got, args=args, train_dataset=lm_examples(), nso_config=NSOConfig(sigma=0.0))
    trainer.train()
    selected = [n for n, _ in trainer._nso_parameters(got)]
    assert selected and all("lora_" in n for n in selected)
    for name, value in params_of(ref).items():
        assert torch.equal(value, params_of(got)[name]), name
    for name, value in packed(got).items():
        assert torch.equal(value, four_bit[name]), name

    # sigma > 0: one step's passes perturb the adapters and put them back bit for bit.
    model = qlora(base_dir)
    before = params_of(model)
    trainer = NSOTrainer(model=model, args=args, train_dataset=lm_examples(), nso_config=NSOConfig(sigma=0.1, num_perturbations=2))
    trainer.current_gradient_accumulation_steps = 1
    model.train()
    trainer.training_step(model, first_batch(trainer))
    for name, value in params_of(model).items():
        assert torch.equal(value, before[name]), name
    assert any(p.grad is not None and p.grad.abs().max() > 0 for n, p in model.named_parameters() if "lora_" in n)
