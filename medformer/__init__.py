"""The Medformer in pure PyTorch (no Flower): data, model, pretext tasks, DP-SGD, evaluation.

``medformer.load_pretrained(MODEL_DIR)`` loads an exported model (``medfl export``, ``medfl finetune``),
ready to embed or fine-tune; ``medformer.save_pretrained`` writes one (``medformer.pretrained``).
"""

__all__ = ["load_pretrained", "save_pretrained"]


def __getattr__(name: str):
    # Lazy: ``import medformer.data`` stays as light as it was (the CLI starts quickly).
    if name in __all__:
        from medformer import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'medformer' has no attribute {name!r}")
