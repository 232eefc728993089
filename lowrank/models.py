"""Loading a base model for LoRA training: quantization, gradient checkpointing, LoRA config.

Every stage (SFT, reward, PPO) loads its base through :func:`load_base_model`, so a model
that is not a LLaMA-class decoder, or a path that is not a model, is refused here, at the
boundary, with a one-line :class:`~lowrank.errors.UserError`.

Quantization (``quant``):
- ``nf4``: QLoRA (Dettmers et al. 2023): 4-bit NormalFloat weights with double quantization
  (the quantization constants are quantized too), compute in bf16 on CUDA. bitsandbytes >= 0.49
  also runs it on the CPU, where we compute in fp32 (CPU bf16 matmuls are slow on most CPUs).
- ``int8``: LLM.int8 (Dettmers et al. 2022) through bitsandbytes.
- ``none``: bf16 on CUDA when supported, fp32 otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path

from lowrank.errors import UserError
from lowrank.files import check_weights_dir
from lowrank.spm_split import match_sentencepiece

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")
QUANT_CHOICES = ("nf4", "int8", "none")
# model_types refused with a reason of their own rather than the list of supported ones.
REFUSED_ARCHITECTURES = {
    # Gemma 3 4B-27B ship as Gemma3ForConditionalGeneration (a vision tower beside the language model, whose
    # tensors are named language_model.*); the text-only Gemma3ForCausalLM is model_type gemma3_text.
    "gemma3": "is the multimodal Gemma 3 (Gemma3ForConditionalGeneration); lowrank supports text-only Gemma 3, "
              "Gemma3ForCausalLM (model_type gemma3_text)",
}


def unsupported_architecture(where: str, model_type: str | None) -> UserError:
    """The one-line error for a model_type lowrank does not train, merge or export."""
    if model_type in REFUSED_ARCHITECTURES:
        return UserError(f"{where}: model_type '{model_type}' {REFUSED_ARCHITECTURES[model_type]}")
    found = model_type or "none (config.json has no model_type)"
    return UserError(f"{where}: unsupported architecture '{found}'; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def resolve_quant(quant: str, *, cuda: bool | None = None) -> str:
    """``quant`` with "auto" made concrete: nf4 on CUDA, none on a CPU, where bitsandbytes' 4-bit path
    is about 20 times slower (nf4 still runs there when asked for). ``cuda`` defaults to this machine."""
    if quant == "auto":
        return "nf4" if (_cuda_available() if cuda is None else cuda) else "none"
    if quant not in QUANT_CHOICES:
        raise UserError(f"--quant: unknown value '{quant}'; choose auto or one of {', '.join(QUANT_CHOICES)}")
    return quant


def _local_dir(model: str) -> Path | None:
    """The model's local dir, or None when ``model`` looks like a hub id (``org/name``)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{model}: is a file, not a model dir (expected a dir with config.json and safetensors)")
        return path
    # A hub id has exactly one '/', no leading '.', '/' or '~'. Anything else is a missing local path.
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model or not model
    if looks_local:
        raise UserError(f"{model}: model dir not found")
    return None


def read_model_config(model: str) -> dict:
    """config.json of a local dir or hub id, as a dict; UserError when absent or unreadable."""
    local = _local_dir(model)
    if local is not None:
        config_file = local / "config.json"
        if not config_file.is_file():
            raise UserError(f"{model}: no config.json; not a Hugging Face model dir")
    else:
        try:
            from huggingface_hub import hf_hub_download

            config_file = Path(hf_hub_download(model, "config.json"))
        except Exception as e:  # offline, unknown repo, gated repo: all the user's to fix
            raise UserError(f"{model}: not a local dir and could not fetch it from the hub "
                            f"({type(e).__name__}); check the path or the hub id") from None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config_file}: unreadable model config ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file}: model config must be a JSON object")
    return config


def check_architecture(model: str) -> str:
    """The model_type of ``model`` if lowrank supports it; UserError naming what is supported otherwise."""
    config = read_model_config(model)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise unsupported_architecture(model, model_type)
    return model_type


def _check_tokenizer_json(model_dir: Path) -> None:
    """Name the tokenizer file of ``model_dir`` that is not JSON (transformers' error does not say which)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        path = model_dir / name
        if path.is_file():
            try:
                json.loads(path.read_bytes())
            except (ValueError, UnicodeDecodeError) as e:
                where = f" (line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
                raise UserError(f"{path}: not valid JSON{where}") from None


def load_tokenizer(model: str, *, pad_with_eos: bool = True):
    """The model's tokenizer, as every stage (training, data, export, verify) must see it.

    A SentencePiece vocabulary of the LLaMA-1/2 / Mistral kind is made to split text exactly as
    sentencepiece and llama.cpp do (see :func:`match_sentencepiece`). ``pad_with_eos``: give a
    tokenizer without a pad token the eos token as pad (training batches need one; export
    writes only the pad token the model defines).
    """
    from transformers import AutoTokenizer

    from lowrank.tiny import resolve_model_name

    model = resolve_model_name(model)
    read_model_config(model)  # a clear error for a missing dir before transformers' long one
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        _check_tokenizer_json(Path(model))
        raise UserError(f"{model}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
    match_sentencepiece(tokenizer)
    if pad_with_eos and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def compute_dtype(device: str | None = None):
    """bf16 on a CUDA device that supports it, fp32 otherwise (CPU bf16 is slow and gains no memory here)."""
    import torch

    on_cuda = (device is None and _cuda_available()) or (device is not None and str(device).startswith("cuda"))
    if on_cuda and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def quantization_config(quant: str, dtype, *, fsdp: bool = False):
    """The BitsAndBytesConfig for ``quant`` (None for ``none``).

    ``fsdp``: store the packed 4-bit weights as ``dtype`` instead of uint8. FSDP shards only floating
    tensors, and flattens a layer's tensors together only when they share one dtype; bitsandbytes reads
    the packed bytes whatever the storage type, so the storage costs nothing (bitsandbytes' FSDP-QLoRA
    guide: ``bnb_4bit_quant_storage`` must match the dtype of the rest of the model).
    """
    from transformers import BitsAndBytesConfig

    if quant == "nf4":
        storage = {"bnb_4bit_quant_storage": dtype} if fsdp else {}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype, **storage)
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quant == "none":
        return None
    raise UserError(f"--quant: unknown value '{quant}'; choose one of {', '.join(QUANT_CHOICES)}")


def check_fsdp_base(model: str, quant: str, dtype) -> None:
    """Refuse a base whose weights FSDP cannot shard, before it loads: an int8 base (bitsandbytes'
    Int8Params hold int8 data with their scales beside it, which FSDP cannot flatten or shard), or a base
    already quantized in its config.json with a storage other than the compute dtype (a published 4-bit
    checkpoint stores uint8, and transformers loads it as stored, whatever lowrank asks for)."""
    if quant == "int8":
        raise UserError("--quant int8 cannot be sharded by FSDP (bitsandbytes' Int8Params are int8 tensors with "
                        "their scales beside them); use --quant nf4 (QLoRA) or none, or launch with "
                        "recipes/accelerate/ddp.yaml")
    stored = read_model_config(model).get("quantization_config")
    if not isinstance(stored, dict):
        return
    method = stored.get("quant_method", "unknown")
    wanted = str(dtype).removeprefix("torch.")
    if method == "bitsandbytes" and stored.get("load_in_8bit"):
        raise UserError(f"{model}: an 8-bit bitsandbytes checkpoint (config.json quantization_config) cannot be "
                        "sharded by FSDP; train from the unquantized base with --quant nf4")
    storage = str(stored.get("bnb_4bit_quant_storage", "uint8")).removeprefix("torch.")
    if method != "bitsandbytes" or storage != wanted:
        what = f"4-bit weights stored as {storage}" if method == "bitsandbytes" else f"{method} weights"
        raise UserError(f"{model}: already quantized ({what}, config.json quantization_config), which FSDP cannot "
                        f"shard beside {wanted} weights; train from the unquantized base with --quant nf4 "
                        f"(lowrank then stores the 4-bit weights as {wanted})")


def _disable_cpu_weight_repacking(model) -> None:
    """Keep bitsandbytes from repacking nf4 weights for its AVX512-bf16 CPU kernel.

    bitsandbytes 0.50 rewrites a Linear4bit's weight in place into a CPU-specific layout on the
    first forward pass in eval mode without gradients (evaluation, generation). That conversion
    asserts that the output size is a multiple of 32, which small models (and ours) break, and
    it would leave a training model with repacked weights. The plain dequantize path is used instead.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_base_model(model: str, quant: str = "auto", *, gradient_checkpointing: bool = True, device=None,
                    fsdp: bool = False):
    """Load a supported causal LM for LoRA training; returns a transformers model (not yet a PeftModel).

    ``device`` defaults to CUDA when present, else the CPU; ``quant`` "auto" is nf4 on CUDA and none on
    the CPU (resolve_quant). Gradient checkpointing uses the non-reentrant implementation, which works
    with frozen base weights and LoRA inputs without the ``enable_input_require_grads`` trick the
    reentrant one needs.

    ``fsdp``: the base is for FSDP to shard (the caller has refused one it cannot with :func:`check_fsdp_base`,
    as sft does before it touches its output dir): nf4 weights
    are stored in the compute dtype; a base that is not quantized loads on the CPU, where, with
    ``fsdp_cpu_ram_efficient_loading``, transformers reads the weights on the first process only, and
    accelerate moves each process's shard to its GPU and broadcasts the first process's values. A
    4-bit base is quantized on each process's GPU as it loads (bitsandbytes quantizes there).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from lowrank.tiny import resolve_model_name

    model = resolve_model_name(model)
    check_architecture(model)
    check_weights_dir(model)
    device = str(device) if device is not None else ("cuda" if _cuda_available() else "cpu")
    quant = resolve_quant(quant, cuda=device.startswith("cuda"))
    dtype = compute_dtype(device)
    quant_config = quantization_config(quant, dtype, fsdp=fsdp)
    kwargs = {"dtype": dtype} if fsdp and quant_config is None else {"dtype": dtype, "device_map": {"": device}}
    if quant_config is not None:
        kwargs["quantization_config"] = quant_config
    try:
        base = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except OSError as e:
        raise UserError(f"{model}: cannot load the model weights ({str(e).splitlines()[0]})") from None
    if quant == "nf4" and device.startswith("cpu"):  # "cpu:0" under a multi-process launch
        _disable_cpu_weight_repacking(base)
    prepare_for_training(base, gradient_checkpointing)
    log.info("loaded %s (%s, %s, gradient checkpointing %s) on %s", model, quant, str(dtype).removeprefix("torch."),
             "on" if gradient_checkpointing else "off", device)
    return base


def prepare_for_training(base, gradient_checkpointing: bool = True) -> None:
    """Freeze a loaded base and switch (non-reentrant) gradient checkpointing on or off, in place.

    The base keeps its loaded dtypes. peft's prepare_model_for_kbit_training would also cast every
    non-quantized half-precision weight to fp32: embeddings and LM head (2 x vocab x hidden x 4
    bytes: 1 GiB on Llama-2-7B, 4 GiB on Llama-3-8B, for weights that do not train) and the norms,
    whose fp32 output turns the whole residual stream, and so every activation kept for the
    backward pass, into fp32. Norms compute their statistics in fp32 anyway, the LoRA weights are
    fp32 (peft), and the loss upcasts each chunk of logits (lowrank.lm_loss.linear_cross_entropy_sum).
    """
    for p in base.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (the reentrant one does),
        # so a frozen base with LoRA inside works as is. transformers 5 renamed the method.
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not gradient_checkpointing and is_checkpointing(base):
        (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()
    base.config.use_cache = not gradient_checkpointing  # the KV cache is useless (and warns) when checkpointing


def is_checkpointing(model) -> bool:
    """Whether gradient (activation) checkpointing is on, under either transformers name."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules="all-linear"):
    """A peft LoraConfig for causal-LM training.

    ``"all-linear"`` is peft's shorthand for every linear layer except the output layer (lm_head):
    the attention q/k/v/o and MLP gate/up/down projections, as the QLoRA paper found necessary to
    match full fine-tuning. A list or comma-separated string selects module names instead.
    """
    from peft import LoraConfig

    if r < 1:
        raise UserError(f"--lora-r must be at least 1, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"--lora-dropout must be in [0, 1), got {dropout}")
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [m.strip() for m in target_modules.split(",") if m.strip()]
    if isinstance(target_modules, (list, tuple)) and list(target_modules) == ["all-linear"]:
        target_modules = "all-linear"
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      bias="none", task_type="CAUSAL_LM")


def _safetensors_header(path: Path) -> bytes:
    """The JSON header of a .safetensors file: 8-byte little-endian length, then that many bytes."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return f.read(min(length, 100_000_000))


_DIGEST_WHOLE_FILE = 64 << 20  # weights files up to this size are hashed whole
_DIGEST_SAMPLES, _DIGEST_SAMPLE_BYTES = 256, 64 << 10  # larger ones: this many evenly spaced chunks


def _hash_weights_data(h, path: Path) -> None:
    """Feed ``path``'s bytes to ``h``: all of them for a small file, evenly spaced chunks of a large one.

    Two bases with the same config and shapes (a base and its chat fine-tune, or two seeds of a
    tiny model) have identical safetensors headers; only the values tell them apart. A fine-tune
    changes practically every tensor, so 256 chunks of 64 KiB (16 MiB read) spread over a multi-GB
    file catch it while keeping the digest of a 7B model well under a second.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= _DIGEST_WHOLE_FILE:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return
        stride = (size - _DIGEST_SAMPLE_BYTES) // (_DIGEST_SAMPLES - 1)
        for i in range(_DIGEST_SAMPLES):
            f.seek(i * stride)
            h.update(f.read(_DIGEST_SAMPLE_BYTES))


def model_digest(model: str) -> str:
    """A stable sha256 of a model: config.json plus each weights file's name, size, header and data.

    The safetensors headers (tensor names, dtypes, shapes, offsets) change when the weights file
    is replaced by one of another shape; the data (hashed whole for files up to 64 MiB, sampled
    in 256 evenly spaced chunks above) tells apart bases of the same shape, such as a model and
    its chat fine-tune. That keeps it under a second on a 7B model. A hub id without a local copy
    digests its config and the hub's file hashes.
    """
    from lowrank.tiny import resolve_model_name

    model = resolve_model_name(model)
    h = hashlib.sha256()
    local = _local_dir(model)
    if local is None:
        h.update(json.dumps(read_model_config(model), sort_keys=True).encode())
        try:
            from huggingface_hub import HfApi

            info = HfApi().model_info(model, files_metadata=True)
            for s in sorted(info.siblings or [], key=lambda s: s.rfilename):
                if s.rfilename.endswith((".safetensors", ".bin")):
                    h.update(f"{s.rfilename}:{s.size}:{(s.lfs or {}).get('sha256', '') if isinstance(s.lfs, dict) else getattr(s.lfs, 'sha256', '')}".encode())
        except Exception:
            log.warning("%s: could not read weight file hashes from the hub; digest covers config only", model)
        return h.hexdigest()
    config_file = local / "config.json"
    if not config_file.is_file():
        raise UserError(f"{model}: no config.json; not a Hugging Face model dir")
    h.update(b"config.json\0" + config_file.read_bytes())
    for weights in sorted(local.glob("*.safetensors")):
        h.update(f"\0{weights.name}\0{weights.stat().st_size}\0".encode())
        h.update(_safetensors_header(weights))
        _hash_weights_data(h, weights)
    for weights in sorted(local.glob("*.bin")):  # legacy pickles
        h.update(f"\0{weights.name}\0{weights.stat().st_size}\0".encode())
        _hash_weights_data(h, weights)
    return h.hexdigest()
