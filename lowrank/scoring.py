"""The reward model's score: a scalar head on the shared causal-LM base, read at the last real token.

- The base stays a *causal LM* (the same object the policy uses in PPO). ``add_score_head``
  attaches one extra module, ``base.score = nn.Linear(hidden, 1)``, which the reward adapter's LoRA
  config lists in ``modules_to_save``: peft keeps one copy per adapter, switched by ``set_adapter``
  with that adapter's LoRA weights, and saves it in ``adapter_model.safetensors``. The result is a
  standard PEFT dir (``PeftModel.from_pretrained`` loads it once the base has its ``score`` module).
- Not AutoModelForSequenceClassification: PPO needs the LM head of the same base for the policy,
  and one object must serve both.
- ``decoder_states`` + ``apply_score_head`` are the one decoder-plus-head forward: the reward
  score (InstructGPT reads it at the end of the response, here the end-of-turn marker) and PPO's
  values (the value role's copy of the head on every response position).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from lowrank import runrecord
from lowrank.errors import UserError
from lowrank.files import check_weights_dir
from lowrank.lm_loss import causal_lm

SCORE_HEAD = "score"  # attribute name of the head on the base model, and its modules_to_save entry
MEMBERS = "members"  # subdir of a reward ensemble's other models (lowrank reward --ensemble)


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


def pad_batch(sequences: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask), each (batch, longest)."""
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids.to(device), attention_mask.to(device)


def decoder_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states (batch, seq, hidden) under the active adapter.

    The model is called as a whole (so DDP's hooks apply under ``accelerate launch``) with the LM
    head on one position only: the (batch, seq, vocab) logits are never built, which would dominate
    memory at a 32k-128k vocabulary. Positions count real tokens only, so a left-padded row gets the
    same positions (and the same states) as the unpadded sequence.
    """
    from lowrank.rollout import position_ids
    from lowrank.lm_loss import final_hidden_states

    return final_hidden_states(model, {"input_ids": input_ids, "attention_mask": attention_mask,
                                       "position_ids": position_ids(attention_mask)})


def apply_score_head(model, hidden: torch.Tensor) -> torch.Tensor:
    """The score head on hidden states (..., hidden) -> fp32 scores (...): reward scores and PPO's values."""
    head = getattr(causal_lm(model), SCORE_HEAD, None)
    if head is None:
        raise ValueError("model has no score head: load a reward adapter with load_reward_adapter first")
    return head(hidden.to(next(head.parameters()).dtype)).squeeze(-1).float()


def score_sequences(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    adapter_name: str | None = None) -> torch.Tensor:
    """Scalar rewards, shape (batch,), fp32, of token sequences under reward adapter ``adapter_name``:
    the score head on the last real token's state (:func:`decoder_states`, :func:`apply_score_head`).
    Gradients flow (PPO trains the value copy this way); wrap in ``torch.no_grad()`` to score a
    frozen adapter.
    """
    with using_adapter(model, adapter_name):
        hidden = decoder_states(model, input_ids, attention_mask)
        last = last_token_index(attention_mask).to(hidden.device)
        return apply_score_head(model, hidden[torch.arange(hidden.shape[0], device=hidden.device), last])


def ensemble_members(reward_dir: str | Path, meta: runrecord.RunRecord | None = None) -> list[Path]:
    """The other reward adapters of an ensemble (`lowrank reward --ensemble`; none for one model), each
    checked to be there and finished. Their dirs are recorded relative to ``reward_dir``."""
    meta = meta or runrecord.read(reward_dir)
    members = [Path(reward_dir) / m for m in meta.extra.get("members") or []]
    for member in members:
        if not runrecord.exists(member):
            raise UserError(f"{member}: a member of the reward ensemble in {reward_dir} is missing or unfinished; "
                            "train the ensemble again with `lowrank reward --ensemble N --overwrite`")
    return members


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
                quant: str | None = None, batch_size: int = 8, model=None) -> list[float]:
    """Scores of (prompt, response) pairs under a saved reward adapter; what `lowrank score` prints.

    ``prompt`` is a user message or a list of messages; the conversation is rendered with the
    template recorded in the adapter's lowrank.json, as in training. ``base`` defaults to the
    recorded base, ``quant`` to the quantization it was trained with. ``model``: that base already
    loaded (a PeftModel holding other adapters, or a bare transformers model) to load the reward
    adapter into, instead of loading the base again.
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
    if model is None:
        model = load_base_model(model_path, quant or meta.quant, gradient_checkpointing=False)
    model = load_reward_adapter(model, reward_dir, adapter_name="reward")
    names = ["reward"]
    for number, member in enumerate(ensemble_members(reward_dir, meta), 2):  # an ensemble: the mean of its scores
        names.append(f"member_{number}")
        load_reward_adapter(model, member, adapter_name=names[-1])
    model.eval()
    device = model.get_base_model().get_output_embeddings().weight.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores: list[float] = []
    with torch.no_grad():
        for start in range(0, len(sequences), batch_size):
            input_ids, attention_mask = pad_batch(sequences[start: start + batch_size], pad_id, device)
            each = [score_sequences(model, input_ids, attention_mask, adapter_name=name) for name in names]
            scores.extend(torch.stack(each).mean(0).tolist())
    return scores
