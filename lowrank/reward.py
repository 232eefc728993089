"""Reward model: a LoRA adapter plus a scalar score head on the shared base (InstructGPT step 2).

Structure (one base, many adapters; see docs of PPO in lowrank/ppo.py):
- The base stays a *causal LM* (the same object the policy uses in PPO). We attach one extra
  module to it, ``base.score = nn.Linear(hidden, 1)``, and list ``"score"`` in the LoRA config's
  ``modules_to_save``. peft then wraps it in a ``ModulesToSaveWrapper`` that keeps one trainable
  copy per adapter, switched by ``set_adapter`` together with that adapter's LoRA weights, and
  saves the head in ``adapter_model.safetensors`` as ``base_model.model.score.{weight,bias}``.
  The output is therefore a standard PEFT dir: ``PeftModel.from_pretrained`` loads it, provided
  the base has a ``score`` module of the right shape first (``add_score_head``).
- We did not use AutoModelForSequenceClassification: PPO needs the LM head of the same base for the
  policy, and one object must serve both.
- The score is the head applied to the final hidden state of the last non-padding token
  (InstructGPT reads the reward at the end of the response; with a chat template that token is
  the end-of-turn marker).

Training (``train_reward``) is the pairwise Bradley-Terry loss -log sigmoid(r_chosen - r_rejected)
over preference pairs, with held-out pairwise accuracy and mean margin as the metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from lowrank import locks, runrecord
from lowrank.config import config_to_dict
from lowrank.errors import UserError
from lowrank.metrics import MetricsLog, TrackerFields
from lowrank.files import check_weights_dir
from lowrank.train import causal_lm

log = logging.getLogger(__name__)

SCORE_HEAD = "score"  # attribute name of the head on the base model, and its modules_to_save entry
# Module names that must never get a LoRA: the LM head (tied to embeddings in some models) and our head.
_NOT_LORA_TARGETS = ("lm_head", SCORE_HEAD)


# --------------------------------------------------------------------------------------------
# Model structure
# --------------------------------------------------------------------------------------------

def add_score_head(model, *, seed: int = 0) -> nn.Module:
    """Attach ``score = nn.Linear(hidden, 1)`` (fp32) to the causal-LM base; return the head.

    Idempotent: an existing head (plain or already wrapped by peft) is returned as is. Must be
    called before a reward adapter is created or loaded, so that peft finds the module named in
    ``modules_to_save``. The head is initialised from its own seeded generator (normal, std
    1/sqrt(hidden + 1)) so the initial rewards do not depend on the global RNG state.
    """
    base = causal_lm(model)
    if hasattr(base, SCORE_HEAD):
        return getattr(base, SCORE_HEAD)
    hidden = base.config.get_text_config().hidden_size
    head = nn.Linear(hidden, 1, bias=True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / math.sqrt(hidden + 1), generator=generator)
        head.bias.zero_()
    # The last hidden state lives where the LM head lives (matters for device_map="auto").
    device = base.get_output_embeddings().weight.device
    # fp32 even on a bf16/4-bit base: a scalar head is tiny and rewards need the precision.
    setattr(base, SCORE_HEAD, head.to(device=device, dtype=torch.float32))
    return getattr(base, SCORE_HEAD)


def linear_target_modules(model) -> list[str]:
    """Names (leaf) of the linear layers a LoRA should adapt: all of them but the LM head and score.

    peft's "all-linear" would also pick up our score head (a plain nn.Linear) and write it into
    target_modules; listing the names ourselves keeps adapter_config.json clean for merge/export.
    bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear, so quantized bases work too.
    """
    names = {name.rsplit(".", 1)[-1] for name, module in causal_lm(model).named_modules()
             if isinstance(module, nn.Linear) and name}
    return sorted(names - set(_NOT_LORA_TARGETS))


def _is_excluded_target(name: str) -> bool:
    """True for a module name (leaf or dotted path) that a reward adapter must not give a LoRA."""
    return name.rsplit(".", 1)[-1] in _NOT_LORA_TARGETS


_ONLY_LM_HEAD = ("{}: its LoRA adapts only the LM head, which the reward model does not use; "
                 "give an SFT adapter with LoRA on the decoder layers, or none")


def read_sft_lora_config(sft_adapter: str | Path):
    """The LoraConfig of an SFT adapter dir; UserError when it is not one, or when its LoRA is on the LM
    head alone (nothing a reward adapter could start from). Cheap: call it before loading the model."""
    from peft import LoraConfig

    try:
        config = LoraConfig.from_pretrained(str(sft_adapter))
    except Exception as e:  # not JSON, not a LoRA config, unknown fields of another peft version
        raise UserError(f"{sft_adapter}/adapter_config.json: not a LoRA adapter config "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    targets = config.target_modules
    if isinstance(targets, (list, set, tuple)) and not [t for t in targets if not _is_excluded_target(t)]:
        raise UserError(_ONLY_LM_HEAD.format(sft_adapter))
    return config


def reward_lora_config(model, *, r: int, alpha: int, dropout: float, sft_adapter: str | Path | None = None):
    """LoraConfig of a reward adapter: the SFT adapter's own (so its weights load) or a fresh one,
    with the score head in ``modules_to_save``.

    From an SFT adapter, the LM head is dropped from the LoRA targets (and any SFT
    ``modules_to_save`` with it): the score reads the last hidden state, before the LM head, so a
    LoRA there would do nothing for the reward. ``_load_sft_lora`` skips those weights, saying so.
    """
    import re

    if sft_adapter is not None:
        config = read_sft_lora_config(sft_adapter)
        config.inference_mode = False
        targets = config.target_modules
        if targets == "all-linear":
            targets = linear_target_modules(model)
        elif isinstance(targets, str):  # a regex over full module names: resolve it, then drop the heads
            targets = sorted(name for name, _ in causal_lm(model).named_modules()
                             if name and re.fullmatch(targets, name) and not _is_excluded_target(name))
        else:
            targets = sorted(t for t in targets if not _is_excluded_target(t))
        if not targets:
            raise UserError(_ONLY_LM_HEAD.format(sft_adapter))
        config.target_modules = targets
        # Whole modules the SFT adapter trained (other than the LM head) stay trained modules here.
        kept = [m for m in (config.modules_to_save or []) if not _is_excluded_target(m)]
    else:
        from lowrank.models import lora_config

        config = lora_config(r=r, alpha=alpha, dropout=dropout, target_modules=linear_target_modules(model))
        kept = []
    config.modules_to_save = [*kept, SCORE_HEAD]
    config.task_type = None  # a custom head: no peft task wrapper (it would expect AutoModelFor*)
    return config


@contextlib.contextmanager
def using_adapter(model, adapter_name: str | None) -> Iterator[None]:
    """Make ``adapter_name`` the active adapter inside the block, then restore the previous one.

    peft's ``set_adapter`` also changes ``requires_grad`` (the named adapter becomes trainable,
    the others frozen); we put every flag back right after each switch so that scoring with a
    frozen adapter never makes it trainable, and a trainable one (PPO's value) keeps its grads.
    """
    if adapter_name is None or not hasattr(model, "peft_config") or model.active_adapter == adapter_name:
        yield
        return
    if adapter_name not in model.peft_config:
        raise KeyError(f"adapter {adapter_name!r} is not loaded (loaded: {', '.join(model.peft_config)})")
    previous = model.active_adapter
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def switch(name: str) -> None:
        model.set_adapter(name)
        for p, flag in flags:
            p.requires_grad_(flag)

    switch(adapter_name)
    try:
        yield
    finally:
        switch(previous)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row, for right *and* left padding.

    With right padding ([1 1 1 0 0]) the last position is padding, so reading position -1 would
    score a pad token; with left padding ([0 0 1 1 1]) it is the last position. Finding the last 1
    in the mask handles both: (seq - 1) - argmax over the reversed mask.
    """
    seq_len = attention_mask.shape[-1]
    reversed_mask = attention_mask.flip(-1).to(torch.int64)
    return (seq_len - 1) - reversed_mask.argmax(-1)  # (batch,)


def score_sequences(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    adapter_name: str | None = None) -> torch.Tensor:
    """Scalar rewards, shape (batch,), fp32, of token sequences under reward adapter ``adapter_name``.

    Runs only the decoder stack (``base.model``), not the LM head: the (batch, seq, vocab) logits
    are not needed and would dominate memory on a 32k-128k vocabulary. LoRA layers are injected
    in place, so the decoder runs with the active adapter. Gradients flow (PPO trains the value
    copy through this function); wrap in ``torch.no_grad()`` to score a frozen adapter.
    """
    base = causal_lm(model)
    head = getattr(base, SCORE_HEAD, None)
    if head is None:
        raise ValueError("model has no score head: load a reward adapter with load_reward_adapter first")
    decoder = getattr(base, base.base_model_prefix)
    # Positions count real tokens only, so a left-padded row gets the same positions (and the same
    # score) as the unpadded sequence; transformers would otherwise number the pads too.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with using_adapter(model, adapter_name):
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=False).last_hidden_state  # (batch, seq, hidden)
        last = last_token_index(attention_mask).to(hidden.device)
        final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (batch, hidden)
        head_dtype = next(head.parameters()).dtype
        return head(final.to(head_dtype)).squeeze(-1).float()  # (batch,)


# --------------------------------------------------------------------------------------------
# Loading a trained reward adapter
# --------------------------------------------------------------------------------------------

def load_reward_adapter(model, reward_dir: str | Path, adapter_name: str = "reward", *,
                        trainable: bool = False, base: str | None = None):
    """Load a reward adapter (LoRA + score head) as the named adapter ``adapter_name``; return the PeftModel.

    ``model`` is a PeftModel that already holds other adapters (PPO: policy, reference) or a bare
    transformers base; the score head is attached to the base first if missing. Loading the same
    dir a second time under another name with ``trainable=True`` gives PPO's value model, with its
    own copy of the head. When ``base`` (the model name or path) is given, the adapter's recorded
    base digest is checked against it. The active adapter is left unchanged when one existed.
    """
    from peft import PeftModel

    runrecord.read_adapter(reward_dir, stage="reward", what="reward adapter", base=base)
    add_score_head(model)
    if isinstance(model, PeftModel):
        flags = [(p, p.requires_grad) for p in model.parameters()]
        check_weights_dir(reward_dir)
        model.load_adapter(str(reward_dir), adapter_name=adapter_name, is_trainable=trainable)
        for p, flag in flags:  # load_adapter may touch other adapters' flags; keep them
            p.requires_grad_(flag)
        return model
    check_weights_dir(reward_dir)
    return PeftModel.from_pretrained(model, str(reward_dir), adapter_name=adapter_name, is_trainable=trainable)


def score_texts(reward_dir: str | Path, base: str | None, pairs: list[tuple[str | list[dict], str]], *,
                quant: str | None = None, batch_size: int = 8) -> list[float]:
    """Scores of (prompt, response) pairs under a saved reward adapter; what `lowrank score` prints.

    ``prompt`` is a user message or a list of messages; the conversation is rendered with the
    template recorded in the adapter's lowrank.json, as in training. ``base`` defaults to the
    recorded base, ``quant`` to the quantization it was trained with.
    """
    from lowrank.data import tokenize_conversation
    from lowrank.models import load_base_model, load_tokenizer
    from lowrank.tiny import resolve_model_name

    meta = runrecord.read_adapter(reward_dir, stage="reward", what="reward adapter")
    base = base or meta.base.id
    if not base:
        raise UserError(f"{reward_dir}/{runrecord.RECORD_FILE} names no base model; give --model")
    runrecord.check_base(meta, reward_dir, base=base)
    model_path = resolve_model_name(base)
    tokenizer = load_tokenizer(model_path)
    if meta.chat_template is None:
        raise UserError(f"{reward_dir}/{runrecord.RECORD_FILE} records no chat template; retrain it with `lowrank reward`")
    template = meta.chat_template.jinja
    max_length = int(meta.config.get("max_length", 4096))
    sequences = []
    for prompt, response in pairs:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        messages.append({"role": "assistant", "content": response})
        sequences.append(tokenize_conversation(tokenizer, template, messages, max_length)["input_ids"])
    quant = quant or meta.quant
    model = load_reward_adapter(load_base_model(model_path, quant, gradient_checkpointing=False), reward_dir)
    model.eval()
    device = model.get_base_model().get_output_embeddings().weight.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            input_ids, attention_mask = pad_batch(sequences[start: start + batch_size], pad_id, device)
            scores.extend(score_sequences(model, input_ids, attention_mask).tolist())
    return scores


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

@dataclass
class RewardConfig(TrackerFields):
    """Settings of `lowrank reward` (flags: --model, --data, --output-dir, ...)."""

    model: str = field(default="tiny", metadata={"help": "base model: Hugging Face dir or hub id, or 'tiny'"})
    data: str = field(default="", metadata={"help": "preference pairs (.json/.jsonl with prompt/chosen/rejected, or a hub dataset)"})
    output_dir: str = field(default="", metadata={"help": "where the reward adapter is written"})
    sft_adapter: str | None = field(default=None, metadata={"help": "SFT adapter dir to initialise the LoRA from (and take the chat template of)"})
    quant: str = field(default="auto", metadata={"help": "base weights: nf4 (QLoRA), int8, none, or auto (nf4 on CUDA, none on a CPU, where bitsandbytes' 4-bit is ~20x slower)"})
    template: str | None = field(default=None, metadata={"help": "chat template when no SFT adapter is given: auto, tokenizer or a built-in name"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (ignored with --sft-adapter: its rank is kept)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (ignored with --sft-adapter)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (ignored with --sft-adapter)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps, then constant"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    center_rewards: float = field(default=0.0, metadata={"help": "weight of the centring term mean((r_chosen + "
                                                                 "r_rejected)^2) (Eisenstein et al. 2023; 0: off): "
                                                                 "scores comparable across prompts, as PPO needs"})
    optim_bits: int = field(default=32, metadata={"help": "paged AdamW state bits on CUDA with a quantized base: 32 or 8"})
    batch_size: int = field(default=8, metadata={"help": "preference pairs per micro-batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    tokens_per_step: int = field(default=0, metadata={"help": "tokens (chosen + rejected) per optimizer step; when > 0 it sets the micro-batches per step (replaces --gradient-accumulation-steps)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training pairs (when max_steps is 0)"})
    max_steps: int = field(default=0, metadata={"help": "optimizer steps; overrides epochs when > 0"})
    max_length: int = field(default=512, metadata={"help": "tokens per prompt+response (longer ones are cut)"})
    eval_fraction: float = field(default=0.1, metadata={"help": "share of pairs held out for accuracy/margin"})
    eval_every: int = field(default=20, metadata={"help": "evaluate every N optimizer steps (and at the end)"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "trade compute for activation memory"})
    seed: int = field(default=0, metadata={"help": "seed of the split, head init, LoRA init and shuffling"})
    overwrite: bool = field(default=False, metadata={"help": "replace a finished run in output_dir"})


def _as_messages(turn) -> list[dict]:
    """A response given as text, or as the assistant part of a conversation (list of messages)."""
    return [{"role": "assistant", "content": turn}] if isinstance(turn, str) else list(turn)


def _response_text(turn) -> str:
    return turn if isinstance(turn, str) else "\n".join(str(m.get("content", "")) for m in turn)


def tokenize_pairs(tokenizer, template: str, pairs: list[dict], max_length: int) -> list[dict]:
    """Token ids of each pair's chosen and rejected conversation, rendered with the SFT template.

    Refuses empty and identical responses (lowrank.data checks them too, naming the line; this guard
    covers pairs built in code). Pairs that become identical after truncation to ``max_length`` teach nothing and are dropped.
    """
    from lowrank.data import tokenize_conversation

    examples = []
    for number, pair in enumerate(pairs, 1):
        where = pair.get("where") or f"pair {number}"
        chosen_text, rejected_text = (_response_text(pair[k]) for k in ("chosen", "rejected"))
        for name, text in (("chosen", chosen_text), ("rejected", rejected_text)):
            if not text.strip():
                raise UserError(f"{where}: the {name} response is empty; every pair needs two non-empty responses")
        if chosen_text.strip() == rejected_text.strip():
            raise UserError(f"{where}: chosen and rejected responses are identical; such a pair has no preference")
        prompt = list(pair["prompt_messages"])
        chosen = tokenize_conversation(tokenizer, template, prompt + _as_messages(pair["chosen"]), max_length)
        rejected = tokenize_conversation(tokenizer, template, prompt + _as_messages(pair["rejected"]), max_length)
        if chosen["input_ids"] != rejected["input_ids"]:
            examples.append({"chosen": chosen["input_ids"], "rejected": rejected["input_ids"]})
    if not examples:
        raise UserError(f"every preference pair is identical after truncation to {max_length} tokens; "
                        "raise --max-length")
    if len(examples) < len(pairs):
        log.warning("dropped %d pairs whose chosen and rejected are identical after truncation to %d tokens",
                    len(pairs) - len(examples), max_length)
    return examples


def pad_batch(sequences: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask), each (batch, longest)."""
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids.to(device), attention_mask.to(device)


def pair_rewards(model, examples: list[dict], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_rewards, rejected_rewards), each (batch,): both halves in one forward pass."""
    input_ids, attention_mask = pad_batch([e["chosen"] for e in examples] + [e["rejected"] for e in examples],
                                          pad_id, device)
    rewards = score_sequences(model, input_ids, attention_mask)
    return rewards[: len(examples)], rewards[len(examples):]


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       center: float = 0.0) -> torch.Tensor:
    """Per-pair -log sigmoid(r_chosen - r_rejected), shape (batch,): the Bradley-Terry negative log-likelihood
    that the chosen response is preferred (InstructGPT eq. 1). logsigmoid is the stable form.

    The loss sees only differences, so each prompt's scores may carry an offset of their own; PPO
    compares scores across prompts, where those offsets are noise. ``center`` > 0 adds
    center * (r_chosen + r_rejected)^2 (Eisenstein et al. 2023, "Helping or Herding?"), which pulls
    each pair's mean score to 0 and so puts every prompt on one scale.
    """
    loss = -torch.nn.functional.logsigmoid(chosen_rewards - rejected_rewards)
    if center:
        loss = loss + center * (chosen_rewards + rejected_rewards) ** 2
    return loss


def cross_prompt_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Share of (chosen of pair i, rejected of pair j) over all i, j with r_chosen_i > r_rejected_j.

    Pairwise accuracy (i = j) is what the Bradley-Terry loss trains; this is what an RL stage with
    one baseline for a whole batch of prompts relies on: a right answer to one prompt scoring above a
    wrong answer to another. Per-prompt offsets pull it toward 0.5 while pairwise accuracy stays high.
    """
    return (chosen_rewards[:, None] > rejected_rewards[None, :]).float().mean().item()


@torch.no_grad()
def evaluate_pairs(model, examples: list[dict], pad_id: int, batch_size: int, device=None) -> dict:
    """Pairwise accuracy (share with r_chosen > r_rejected), mean margin, loss, cross-prompt accuracy
    and the mean score over ``examples``."""
    was_training = model.training
    model.eval()
    chosen_parts, rejected_parts = [], []
    for start in range(0, len(examples), batch_size):
        chosen, rejected = pair_rewards(model, examples[start: start + batch_size], pad_id, device)
        chosen_parts.append(chosen)
        rejected_parts.append(rejected)
    model.train(was_training)
    chosen, rejected = torch.cat(chosen_parts).float(), torch.cat(rejected_parts).float()
    margin = chosen - rejected
    return {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item(),
            "loss": (-torch.nn.functional.logsigmoid(margin)).mean().item(),
            "cross_prompt_accuracy": cross_prompt_accuracy(chosen, rejected),
            "score_mean": torch.cat([chosen, rejected]).mean().item()}


def _split(examples: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded shuffle, then the last ``eval_fraction`` of pairs held out (at least one when there are >= 2)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(eval_fraction * len(examples)))) if eval_fraction > 0 else 0
    shuffled = [examples[i] for i in order]
    return shuffled[: len(shuffled) - n_eval], shuffled[len(shuffled) - n_eval:]


def _module_of_weight(key: str) -> str:
    """The module path of a peft state-dict key: 'base_model.model.lm_head.lora_A.weight' -> '...lm_head'."""
    parts = key.split(".")
    for marker in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
        if marker in parts:
            return ".".join(parts[: parts.index(marker)])
    parts = parts[:-1]  # a saved whole module (modules_to_save) or base layer: drop 'weight' / 'bias'
    return ".".join(parts[:-1] if parts and parts[-1] == "base_layer" else parts)


def _load_sft_lora(peft_model, sft_adapter: Path, adapter_name: str) -> None:
    """Copy the SFT adapter's LoRA weights into the reward adapter (same targets and rank); the head
    keeps its fresh initialisation (peft wants every saved module in the state dict, so we start
    from the adapter's own state and overwrite the LoRA part).

    Weights of the LM head (a LoRA on ``lm_head``, or the head saved whole) are skipped with a log
    line: ``reward_lora_config`` left the head out, since the score never passes through it.
    Any other weight the reward adapter lacks, or one of another shape, is an adapter of another base.
    """
    from peft import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    try:
        sft_weights = load_peft_weights(str(sft_adapter), device="cpu")
    except Exception as e:  # a missing or corrupt adapter_model.safetensors
        raise UserError(f"{sft_adapter}: cannot read its adapter weights ({type(e).__name__}); "
                        "give the output dir of a completed `lowrank sft` run") from None
    skipped = sorted({_module_of_weight(k) for k in sft_weights if _is_excluded_target(_module_of_weight(k))})
    if skipped:
        sft_weights = {k: v for k, v in sft_weights.items() if not _is_excluded_target(_module_of_weight(k))}
        log.info("%s: not loading the SFT adapter's weights of %s into the reward adapter (the score reads the "
                 "hidden state before the LM head)", sft_adapter, ", ".join(m.rsplit(".", 1)[-1] for m in skipped))
    unknown = sorted(set(sft_weights) - set(state))
    if unknown:
        raise UserError(f"{sft_adapter}: its LoRA weights do not fit this base (e.g. {unknown[0]}); "
                        "was it trained on another model?")
    wrong = [k for k in sft_weights if sft_weights[k].shape != state[k].shape]
    if wrong:
        raise UserError(f"{sft_adapter}: weight {wrong[0]} has shape {tuple(sft_weights[wrong[0]].shape)}, the "
                        f"reward adapter expects {tuple(state[wrong[0]].shape)}; was it trained on another model?")
    set_peft_model_state_dict(peft_model, {**state, **sft_weights}, adapter_name=adapter_name)


def train_reward(config: RewardConfig, on_step: Callable[[dict], None] | None = None) -> Path:
    """Train a reward adapter on preference pairs and write it to ``config.output_dir``; return that path.

    ``on_step`` gets a dict per optimizer step (step, max_steps, loss, lr, and after an evaluation
    eval_accuracy / eval_margin / eval_loss); the same dicts go to metrics.jsonl.
    """
    from peft import get_peft_model

    from lowrank import plan, train
    from lowrank.data import load_preference_pairs
    from lowrank.models import load_base_model, load_tokenizer, resolve_quant
    from lowrank.templates import resolve_template
    from lowrank.tiny import resolve_model_name

    config.quant = resolve_quant(config.quant)  # "auto" becomes this machine's choice, and lowrank.json records that
    if not config.data:
        raise UserError("no preference data: give --data FILE.jsonl (fields prompt, chosen, rejected)")
    if not config.output_dir:
        raise UserError("no output dir: give --output-dir DIR")
    if config.batch_size < 1 or config.gradient_accumulation_steps < 1:
        raise UserError("--batch-size and --gradient-accumulation-steps must be at least 1")
    if config.tokens_per_step < 0:
        raise UserError(f"--tokens-per-step must be 0 (off) or positive, got {config.tokens_per_step}")
    model_path = resolve_model_name(config.model)
    sft_meta = None
    if config.sft_adapter:
        sft_meta = runrecord.read_adapter(config.sft_adapter, stage="sft", what="SFT adapter", base=config.model)
        read_sft_lora_config(config.sft_adapter)
    # Validate every input before touching the output dir or loading the model.
    tokenizer = load_tokenizer(model_path)
    if sft_meta is not None and sft_meta.chat_template:
        template_name, template = sft_meta.chat_template.name, sft_meta.chat_template.jinja
    else:
        template_name, template = resolve_template(tokenizer, config.template)
    pairs = load_preference_pairs(config.data)
    examples = tokenize_pairs(tokenizer, template, pairs, config.max_length)
    train_examples, eval_examples = _split(examples, config.eval_fraction, config.seed)
    train.check_output_dir(config.output_dir, config.overwrite)

    random.seed(config.seed)
    torch.manual_seed(config.seed)  # LoRA init and dropout; the head and the split have their own seeds
    device = "cuda" if torch.cuda.is_available() else "cpu"
    memory_plan = plan.plan_for_training(model_path, "reward", config, device)
    plan.report_start(memory_plan, device)
    base = load_base_model(model_path, config.quant, gradient_checkpointing=config.gradient_checkpointing)
    add_score_head(base, seed=config.seed)
    lora = reward_lora_config(base, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                              sft_adapter=config.sft_adapter)
    model = get_peft_model(base, lora)
    if config.sft_adapter:
        _load_sft_lora(model, Path(config.sft_adapter), "default")
    # Every input has been checked (an SFT adapter that does not fit refuses above): now the output dir.
    out_dir = train.prepare_output_dir(config.output_dir, config.overwrite)
    model.train()
    device = base.get_output_embeddings().weight.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    accumulation = config.gradient_accumulation_steps
    if config.tokens_per_step:
        accumulation = train.accumulation_for_tokens(
            config.tokens_per_step, [len(e["chosen"]) + len(e["rejected"]) for e in train_examples], config.batch_size)
    pairs_per_step = config.batch_size * accumulation
    steps_per_epoch = max(1, math.ceil(len(train_examples) / pairs_per_step))
    max_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = train.build_optimizer(params, config.learning_rate, weight_decay=config.weight_decay,
                                      paged=config.quant != "none", optim_bits=config.optim_bits)
    scheduler = train.build_scheduler(optimizer, warmup_steps=config.warmup_steps, max_steps=max_steps,
                                      kind="constant")
    metrics_log = MetricsLog(out_dir, report_to=config.report_to, stage="reward",
                             config=config_to_dict(config))
    order_rng = random.Random(config.seed)
    order: list[int] = []
    final: dict = {}
    for step in range(1, max_steps + 1):
        optimizer.zero_grad(set_to_none=True)
        step_loss, step_correct, step_pairs = 0.0, 0, 0
        for _ in range(accumulation):
            if len(order) < config.batch_size:  # a new epoch: reshuffle
                fresh = list(range(len(train_examples)))
                order_rng.shuffle(fresh)
                order.extend(fresh)
            batch = [train_examples[i] for i in order[: config.batch_size]]
            del order[: config.batch_size]
            chosen, rejected = pair_rewards(model, batch, pad_id, device)
            losses = bradley_terry_loss(chosen, rejected, config.center_rewards)
            # Normalise by the pairs of the whole optimizer step, not per micro-batch.
            (losses.sum() / pairs_per_step).backward()
            step_loss += losses.sum().item()
            step_correct += int((chosen > rejected).sum().item())
            step_pairs += len(batch)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        record = {"step": step, "max_steps": max_steps, "pairs": step_pairs, "micro_batches": accumulation,
                  "loss": step_loss / step_pairs,
                  "train_accuracy": step_correct / step_pairs, "lr": scheduler.get_last_lr()[0]}
        if eval_examples and ((config.eval_every > 0 and step % config.eval_every == 0) or step == max_steps):
            scores = evaluate_pairs(model, eval_examples, pad_id, config.batch_size, device)
            record.update({f"eval_{k}": v for k, v in scores.items()})
        metrics_log.log(record)
        final = {**final, **record}
        if on_step is not None:
            on_step(record)

    metrics_log.plot(out_dir / "reward_metrics.png", ["loss", "eval_accuracy", "eval_margin"])
    meta = runrecord.RunRecord(
        stage="reward", base=runrecord.BaseRef.of(config.model, model_path),
        chat_template=runrecord.ChatTemplate(template_name, template),
        data={"source": config.data, "digest": train.data_digest(config.data), "pairs": len(examples),
              "train_pairs": len(train_examples), "eval_pairs": len(eval_examples)},
        config=config_to_dict(config),
        seed=config.seed,
        metrics={**{k: v for k, v in final.items() if k not in ("step", "max_steps", "lr")},
                 **plan.peak_metrics(memory_plan, device)},
        extra={
            "sft_adapter": str(config.sft_adapter) if config.sft_adapter else None,
        },
    )
    train.write_adapter(model, out_dir, meta)
    locks.release(out_dir)  # the output is complete
    return out_dir
