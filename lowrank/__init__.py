"""lowrank: QLoRA SFT, reward modelling and PPO on one small GPU or a CPU, exported to GGUF."""

__version__ = "0.1.0"
