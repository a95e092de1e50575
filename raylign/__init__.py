"""raylign: Ray-based, scalable RL orchestration for LLM post-training."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `raylign.train(config)` without importing Ray, vLLM or torch at `import raylign` time.
    if name == "train":
        import raylign.train as module

        return module
    raise AttributeError(name)
