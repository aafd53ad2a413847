"""Data for unified_lora: GLUE / table loaders, label noise, GLUE metrics, tokenisation.

GLUE MRPC ships with the package (see ATTRIBUTION.md); other GLUE tasks are
read from a folder you provide (`data_dir=` or $UNIFIED_LORA_GLUE_DIR).
"""

from .encode import default_model_path, encode, make_loader
from .loaders import (
    GLUE_ENV_VAR,
    DataError,
    Example,
    TextDataset,
    load_glue,
    load_table,
    normalize_task,
    resolve_glue_dir,
)
from .metrics import (
    accuracy,
    f1_binary,
    glue_metrics,
    macro_f1,
    majority_baseline,
    majority_class,
    matthews_corrcoef,
    primary_metric,
)
from .noise import flip_labels, symmetric_label_noise

__all__ = [
    "GLUE_ENV_VAR",
    "DataError",
    "Example",
    "TextDataset",
    "accuracy",
    "default_model_path",
    "encode",
    "f1_binary",
    "flip_labels",
    "glue_metrics",
    "load_glue",
    "load_table",
    "macro_f1",
    "majority_baseline",
    "majority_class",
    "make_loader",
    "matthews_corrcoef",
    "normalize_task",
    "primary_metric",
    "resolve_glue_dir",
    "symmetric_label_noise",
]
