"""raylign: Ray-based, scalable RL orchestration for LLM post-training."""

__version__ = "0.1.0"
