"""Reproduction: bitsandbytes 0.50.2 on CPU, Linear4bit gives wrong LoRA gradients after one eval-mode forward.

Run from the repository root:
    .venv/bin/python docs/upstream/bnb_cpu_linear4bit_grad_after_eval.py eval-first
    .venv/bin/python docs/upstream/bnb_cpu_linear4bit_grad_after_eval.py train-only

It loads the demo target 4-bit NF4 through transformers' BitsAndBytesConfig, puts a PEFT
LoRA on it and compares the LoRA gradients with a float32 copy whose linear weights are the
dequantized NF4 weights (the same function). Seen here (torch 2.13.0+cpu, transformers 5.19.0,
peft 0.21.2, bitsandbytes 0.50.2, no `kernels` package):

    eval-first loss 11.45445 11.45512 layer0 q lora_A grad cos 0.626
    train-only loss 11.45452 11.45512 layer0 q lora_A grad cos 0.99999

The forward loss agrees either way; only the backward through the frozen 4-bit weights is wrong
once the module has run in eval mode. QLoRA scripts that evaluate before or during training
(ours measured held-out loss first) then train on wrong gradients: our Austen adapter's
training loss rose from 4.7 to 5.4 over 100 steps at lr 5e-4, while the same run against the
dequantized NF4 weights dropped held-out loss from 4.87 to 4.61. To report to bitsandbytes.
"""

import copy
import sys

import bitsandbytes.functional as bnbf
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

torch.manual_seed(0)
q = BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
)
m4 = AutoModelForCausalLM.from_pretrained(
    sys.argv[2] if len(sys.argv) > 2 else "models/target", quantization_config=q, device_map="cpu", dtype=torch.float32
)
m4 = prepare_model_for_kbit_training(m4, use_gradient_checkpointing=False)
ref = AutoModelForCausalLM.from_pretrained(sys.argv[2] if len(sys.argv) > 2 else "models/target", dtype=torch.float32)
for (_, mod4), (_, modr) in zip(m4.named_modules(), ref.named_modules(), strict=True):
    if type(mod4).__name__ == "Linear4bit":
        modr.weight.data.copy_(bnbf.dequantize_4bit(mod4.weight.data, mod4.weight.quant_state).float())
x = torch.randint(0, 4096, (2, 33))
if sys.argv[1] == "eval-first":
    m4.eval()
    with torch.no_grad():
        m4(x[:, :-1])
    m4.train()
cfg = LoraConfig(
    r=16,
    lora_alpha=32,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    init_lora_weights=False,
)
torch.manual_seed(1)
p4 = get_peft_model(m4, cfg)
torch.manual_seed(1)
pr = get_peft_model(ref, copy.deepcopy(cfg))
l4 = p4(x[:, :-1], labels=x[:, :-1]).loss
l4.backward()
lr = pr(x[:, :-1], labels=x[:, :-1]).loss
lr.backward()
g4 = dict((n, p.grad) for n, p in p4.named_parameters() if p.requires_grad)
gr = dict((n, p.grad) for n, p in pr.named_parameters() if p.requires_grad)
n = list(g4)[0]
print(
    sys.argv[1],
    "loss",
    round(l4.item(), 5),
    round(lr.item(), 5),
    "layer0 q lora_A grad cos",
    float(torch.nn.functional.cosine_similarity(g4[n].flatten(), gr[n].flatten(), dim=0)),
)
