"""Rollouts from a merged, dequantized copy of the policy: PPO's and GRPO's fast sampling path.

The plain path samples through peft: every decoding step runs each quantized linear layer
(dequantize, matmul) and its LoRA branch (two more small matmuls, an add), a few kernel launches
each, hundreds of layers per token. Generation never needs the adapters apart, so the fast path
keeps one plain copy of the model in the compute dtype, each LoRA target's weight set to
dequantize(W) + scaling * B @ A of the policy adapter, and generates from it with an ordinary
transformers model: one matmul per layer, no per-step dequantization. After each update the
LoRA targets' weights are rebuilt from the base and the new adapter (``refresh``); everything else
is copied once.

``merged-graphs`` also gives generate() a static KV cache, which transformers compiles with CUDA
graphs (torch.compile, mode "reduce-overhead") on a CUDA device. A device that cannot run that
gets the merged path alone and one line in the log.

The sampling distribution is unchanged: the copy computes the same function as the peft model
with the policy active, up to rounding, and draws from the same generator
(tests/test_fast_rollout.py compares the logits of every step and the sampled tokens).
The copy costs the parameters again in the compute dtype (13.5 GB for a 7B in bf16), which
``lowrank plan --stage ppo|grpo --fast-rollout merged`` counts.
"""

from __future__ import annotations

import logging

import torch

from lowrank.errors import UserError

log = logging.getLogger(__name__)

CHOICES = ("off", "merged", "merged-graphs")


def check(value: str) -> None:
    if value not in CHOICES:
        raise UserError(f"--fast-rollout must be one of {', '.join(CHOICES)}, got {value!r}")


def build(peft_model, adapter: str, mode: str) -> MergedPolicy | None:
    """The merged copy ``mode`` (a --fast-rollout value) asks for; None for off."""
    check(mode)
    return None if mode == "off" else MergedPolicy(peft_model, adapter, graphs=mode == "merged-graphs")


def _base_weight(layer, dtype) -> torch.Tensor:
    """The frozen weight of ``layer`` in ``dtype``, dequantized where bitsandbytes holds it."""
    weight = layer.weight
    if hasattr(weight, "quant_state") or type(weight).__name__ in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_module_weight

        weight = dequantize_module_weight(layer)
    return weight.to(dtype)


class MergedPolicy:
    """A plain copy of ``peft_model``'s base with ``adapter`` merged in, for generate()."""

    def __init__(self, peft_model, adapter: str, *, graphs: bool = False):
        from transformers import AutoModelForCausalLM

        check_adapter(peft_model, adapter)
        base = peft_model.get_base_model()
        self.adapter = adapter
        self.device = next(base.parameters()).device
        self.dtype = getattr(base.config, "torch_dtype", None) or getattr(base.config, "dtype", None) or torch.float32
        if isinstance(self.dtype, str):
            self.dtype = getattr(torch, self.dtype)
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            self.dtype = torch.float32
        config = base.config.to_dict()
        config.pop("quantization_config", None)
        config = type(base.config).from_dict(config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        self.model = model.to_empty(device=self.device).eval().requires_grad_(False)
        self.graphs = graphs and self.device.type == "cuda"
        if graphs and not self.graphs:
            log.info("--fast-rollout merged-graphs needs a CUDA device; sampling on %s from the merged copy without "
                     "CUDA graphs", self.device.type)
        self._lora = self._copy_frozen(base)
        self.refresh(peft_model)

    def _copy_frozen(self, base) -> list[str]:
        """Copy every weight and buffer that no adapter changes; the names of the LoRA targets."""
        from peft.tuners.lora import LoraLayer

        targets = []
        with torch.no_grad():
            for name, module in self.model.named_modules():
                source = base.get_submodule(name) if name else base
                if isinstance(source, LoraLayer):
                    targets.append(name)
                    source = source.get_base_layer()
                    for pname, param in module.named_parameters(recurse=False):
                        if pname != "weight":
                            param.copy_(getattr(source, pname).to(self.dtype))
                    continue
                for pname, param in module.named_parameters(recurse=False):
                    value = _base_weight(source, self.dtype) if pname == "weight" else getattr(source, pname)
                    param.copy_(value.to(self.dtype))
                for bname, buffer in module.named_buffers(recurse=False):
                    buffer.copy_(getattr(source, bname))
        return targets

    @torch.no_grad()
    def refresh(self, peft_model) -> None:
        """Rebuild each LoRA target's weight from the base and the adapter as it is now."""
        base = peft_model.get_base_model()
        for name in self._lora:
            layer = base.get_submodule(name)
            weight = _base_weight(layer.get_base_layer(), torch.float32)
            if self.adapter in layer.lora_A or self.adapter in getattr(layer, "lora_embedding_A", {}):
                weight = weight + layer.get_delta_weight(self.adapter).float()
            self.model.get_submodule(name).weight.copy_(weight.to(self.dtype))

    def generate(self, **kwargs):
        if self.graphs:
            kwargs["cache_implementation"] = "static"
        return self.model.generate(**kwargs)


def check_adapter(peft_model, adapter: str) -> None:
    """Refuse what a merged copy cannot reproduce: DoRA's magnitude vector is not in get_delta_weight."""
    config = peft_model.peft_config[adapter]
    if getattr(config, "use_dora", False):
        raise UserError("--fast-rollout cannot merge a DoRA adapter; use --fast-rollout off")
