"""Every config dataclass rejects a bad value at construction with a ValueError that names the field (and never a
TypeError from a comparison deep inside), and reads numbers written as strings, as YAML 1.1 loads `1e-3`."""

import math
from dataclasses import fields

import pytest

from unified_lora import ActuatorConfig, MachineConfig, MirrorConfig, NestedLoRAConfig, SignalConfig
from unified_lora.multitask import MultiTaskSignalConfig
from unified_lora.training import TrainConfig

NAN, INF = math.nan, math.inf

BAD = [  # (config class, keyword arguments, the message's start)
    (NestedLoRAConfig, dict(rank_levels=()), "rank_levels: must hold at least one rank"),
    (NestedLoRAConfig, dict(rank_levels=(0, 4)), "rank_levels: every rank must be positive"),
    (NestedLoRAConfig, dict(rank_levels=(8, 4)), "rank_levels: must be strictly increasing"),
    (NestedLoRAConfig, dict(rank_levels=(4, 8, 32), max_rank=16), "rank_levels: largest level 32 exceeds max_rank=16"),
    (NestedLoRAConfig, dict(rank_levels=4), "rank_levels: must be a list of integers"),
    (NestedLoRAConfig, dict(rank_levels=("four",)), "rank_levels: must be an integer, got 'four' (str)"),
    (NestedLoRAConfig, dict(rank_levels=(4, 8.5)), "rank_levels: must be an integer, got 8.5"),
    (NestedLoRAConfig, dict(max_rank=-1), "max_rank: must be positive"),
    (NestedLoRAConfig, dict(max_rank="sixteen"), "max_rank: must be an integer"),
    (NestedLoRAConfig, dict(target_modules=[]), "target_modules: must be a non-empty list"),
    (NestedLoRAConfig, dict(target_modules="q_proj("), "target_modules: a string is a regex"),
    (TrainConfig, dict(target_modules="(query|value"), "target_modules: a string is a regex"),
    (NestedLoRAConfig, dict(lora_alpha=0), "lora_alpha: must be a positive finite number"),
    (NestedLoRAConfig, dict(lora_alpha=NAN), "lora_alpha: must be a positive finite number"),
    (NestedLoRAConfig, dict(lora_alpha=None), "lora_alpha: must be a number, got None (NoneType)"),
    (NestedLoRAConfig, dict(lora_dropout=1.0), "lora_dropout: must be in [0, 1)"),
    (NestedLoRAConfig, dict(scaling="alpha"), "scaling: must be one of"),
    (NestedLoRAConfig, dict(kernel="triton"), "kernel: must be one of"),
    (NestedLoRAConfig, dict(autocast_adapter_dtype="yes"), "autocast_adapter_dtype: must be true or false"),
    (NestedLoRAConfig, dict(initial_rank=12), "initial_rank: must be one of rank_levels"),
    (MachineConfig, dict(theta0=-0.1), "theta0: must be a number in [0, 1]"),
    (MachineConfig, dict(theta1=True), "theta1: must be a number, got True (bool)"),
    (MachineConfig, dict(theta0=0.7, theta1=0.3), "theta0: must be < theta1"),
    (MachineConfig, dict(initial_mode=3), "initial_mode: must be 0 (SINGLE), 1 (MULTI) or 2 (MIRROR)"),
    (MachineConfig, dict(warmup_steps=-1), "warmup_steps: must be >= 0"),
    (MachineConfig, dict(eval_interval=None), "eval_interval: must be an integer, got None"),
    (MachineConfig, dict(min_dwell=1.5), "min_dwell: must be an integer, got 1.5"),
    (ActuatorConfig, dict(mode_ranks=(4, 8)), "mode_ranks: needs one rank per mode"),
    (ActuatorConfig, dict(mode_ranks=(8, 4, 16)), "mode_ranks: must be positive and non-decreasing"),
    (ActuatorConfig, dict(mode_ranks=16), "mode_ranks: must be a list of integers"),
    (ActuatorConfig, dict(lr_mode="cosine"), "lr_mode: must be 'absolute', 'multiplier' or 'off'"),
    (ActuatorConfig, dict(mode_lrs=(1e-3, 0, 1e-4)), "mode_lrs: needs three positive finite values"),
    (ActuatorConfig, dict(mode_lrs=(1e-3, INF, 1e-4)), "mode_lrs: needs three positive finite values"),
    (ActuatorConfig, dict(mode_multipliers=(1.0, 1.0)), "mode_multipliers: needs three positive finite values"),
    (MirrorConfig, dict(policy="sometimes"), "policy: must be 'drift', 'never', 'always' or 'loss_worse'"),
    (MirrorConfig, dict(kernel="cuda"), "kernel: must be 'eager' or 'fused'"),
    (MirrorConfig, dict(drift_threshold=0), "drift_threshold: must be a positive number"),
    (MirrorConfig, dict(pack="false"), "pack: must be true or false, got 'false' (str)"),
    (MirrorConfig, dict(pack=None), "pack: must be true or false, got None (NoneType)"),
    (MirrorConfig, dict(offload_to_cpu=1), "offload_to_cpu: must be true or false"),
    (SignalConfig, dict(kind="entropy"), "kind: must be 'loss', 'composite' or 'multitask'"),
    (SignalConfig, dict(alpha=0), "alpha: must be in (0, 1]"),
    (SignalConfig, dict(beta=1.5), "beta: must be in (0, 1]"),
    (SignalConfig, dict(loss_scale=INF), "loss_scale: must be a positive finite number"),
    (SignalConfig, dict(calibration_steps=-5), "calibration_steps: must be >= 0"),
    (SignalConfig, dict(calibration_target=INF), "calibration_target: must be a positive finite number"),
    (SignalConfig, dict(nonfinite="ignore"), "nonfinite: must be 'skip', 'max_stress' or 'raise'"),
    (SignalConfig, dict(history=1), "history: need 2 <= min_history <= history"),
    (SignalConfig, dict(history=5, min_history=10), "history: need 2 <= min_history <= history"),
    (SignalConfig, dict(weights=(0.5, 0.5)), "weights: need three finite weights >= 0"),
    (SignalConfig, dict(weights=(0.5, 0.5, 0.5)), "weights: need three finite weights >= 0"),
    (SignalConfig, dict(weights=(1.2, -0.2, 0.0)), "weights: need three finite weights >= 0"),
    (MultiTaskSignalConfig, dict(alpha="fast"), "alpha: must be a number, got 'fast' (str)"),
    (MultiTaskSignalConfig, dict(weights=(1.0,)), "weights: need six finite weights"),
    (TrainConfig, dict(epochs="two"), "epochs: must be an integer, got 'two' (str)"),
    (TrainConfig, dict(lr="fast"), "lr: must be a number, got 'fast' (str)"),
    (TrainConfig, dict(controller="no"), "controller: must be true or false, got 'no' (str)"),
    (TrainConfig, dict(grad_clip=-1.0), "grad_clip: must be >= 0"),
    (TrainConfig, dict(weight_decay=NAN), "weight_decay: must be a number >= 0"),
    (TrainConfig, dict(threads=-2), "threads: must be >= 0"),
]


@pytest.mark.parametrize("cls,kwargs,message", BAD, ids=[f"{c.__name__}-{next(iter(k))}-{i}" for i, (c, k, _) in
                                                         enumerate(BAD)])
def test_a_bad_value_fails_at_construction_naming_its_field(cls, kwargs, message):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    assert str(info.value).startswith(message), str(info.value)


def test_numbers_written_as_strings_are_read_as_those_numbers():
    # what PyYAML gives for `lr: 1e-3`, `mode_lrs: [2e-3, 5e-4, 1e-4]` and similar
    t = TrainConfig(lr="1e-3", mode_lrs=["2e-3", "5e-4", "1e-4"], epochs="2", rank_levels="4, 8, 16",
                    theta0="0.25", drift_threshold=" 0.1 ")
    assert (t.lr, t.mode_lrs, t.epochs, t.rank_levels, t.theta0, t.drift_threshold) == (
        1e-3, (2e-3, 5e-4, 1e-4), 2, (4, 8, 16), 0.25, 0.1)
    assert type(t.epochs) is int and type(t.lr) is float
    c = NestedLoRAConfig(rank_levels=["4", "8"], max_rank=16.0, lora_alpha="32")
    assert (c.rank_levels, c.max_rank, c.lora_alpha) == ((4, 8), 16, 32.0) and type(c.max_rank) is int
    assert SignalConfig(kind="composite", weights=("0.2", "0.3", "0.5"), history="100").weights == (0.2, 0.3, 0.5)


def test_a_number_list_written_as_a_python_tuple_in_yaml_is_read_as_that_list():
    """YAML has no tuple: `rank_levels: (4, 8, 16)` loads as the string "(4, 8, 16)", which was split into "(4", "8"
    and "16)" and refused with "rank_levels: must be an integer, got '(4' (str)"."""
    import yaml

    d = yaml.safe_load("rank_levels: (4, 8, 16)\nmode_lrs: '[2e-3, 5e-4, 1e-4]'\n")
    t = TrainConfig(**d)
    assert (t.rank_levels, t.mode_lrs) == ((4, 8, 16), (2e-3, 5e-4, 1e-4))
    assert NestedLoRAConfig(rank_levels=" (4, 8) ").rank_levels == (4, 8)
    with pytest.raises(ValueError, match=r"rank_levels: must be an integer, got 'x' \(str\)"):
        TrainConfig(rank_levels="(4, x)")


def test_numpy_numbers_are_numbers():
    np = pytest.importorskip("numpy")
    m = MachineConfig(theta0=np.float32(0.25), warmup_steps=np.int64(3))
    assert (m.theta0, m.warmup_steps) == (0.25, 3) and type(m.warmup_steps) is int


@pytest.mark.parametrize("value,expected", [
    ("all-linear", "all-linear"),
    ("query,value", ["query", "value"]),
    (" query , value ", ["query", "value"]),
    ("attention.self.query", ["attention.self.query"]),  # a dotted suffix is not a regex
    (r".*\.(query|value)", r".*\.(query|value)"),
    ("q_proj|v_proj", "q_proj|v_proj"),
    ("layer.{1,2}", "layer.{1,2}"),  # a regex keeps its commas
    (["query", "value"], ["query", "value"]),
])
def test_target_modules_from_the_command_line_or_yaml(value, expected):
    assert TrainConfig(target_modules=value).target_modules == expected


def test_modules_to_save_as_one_string_is_one_module_not_its_letters():
    from transformers import BertConfig, BertForSequenceClassification

    from unified_lora import setup_unified_lora

    assert NestedLoRAConfig(modules_to_save="classifier").modules_to_save == ["classifier"]
    assert TrainConfig(modules_to_save="classifier, pooler").modules_to_save == ["classifier", "pooler"]
    model = BertForSequenceClassification(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32))
    setup_unified_lora(model, target_modules=["query", "value"], modules_to_save="classifier", print_fn=None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {"classifier.weight", "classifier.bias"}


def test_a_dev_data_mapping_names_some_tasks_or_all_and_a_key_that_is_no_task_is_refused_naming_it():
    """A mapping that left a task out was refused ("no file for 'b'"), so a GLUE folder's task could not keep its
    dev.tsv beside a table's dev file: the tasks left out take their default dev set (None here, read by
    `load_data`); a key that is no task is still one line naming it, the close name and the tasks."""
    data = {"a": "a.csv", "b": "b.csv"}
    assert TrainConfig(data=data, dev_data={"b": "y.csv"}).dev_data == {"b": "y.csv"}
    assert TrainConfig(data=data, dev_data={"b": "y.csv", "a": "x.csv"}).dev_data == {"a": "x.csv", "b": "y.csv"}
    with pytest.raises(ValueError) as e:
        TrainConfig(data=data, dev_data={"a": "x.csv", "bb": "y.csv"})
    assert str(e.value) == ("dev_data: 'bb' is not a task of data (did you mean 'b'?); its keys are task names (a, b), "
                            "each with its dev file (a task left out takes its default dev set)")


def test_a_trainer_users_key_names_the_config_key_it_means():
    """TrainingArguments' and PEFT's names for this config's keys: `learning_rate` was an unknown key with no hint
    (difflib finds nothing close to it among the keys; `lr` is the one), found by the user trial."""
    with pytest.raises(ValueError) as e:
        TrainConfig.from_dict({"learning_rate": 1e-3, "per_device_train_batch_size": 8, "lora_r": 8, "epochz": 1})
    assert str(e.value).startswith(
        "config: unknown key(s) ['epochz', 'learning_rate', 'lora_r', 'per_device_train_batch_size'] ('epochz': did "
        "you mean 'epochs'?; 'learning_rate': did you mean 'lr'?; 'lora_r': did you mean 'rank_levels'?; "
        "'per_device_train_batch_size': did you mean 'batch_size'?); valid keys are [")
    from unified_lora.training import _HF_KEY_NAMES

    assert {f.name for f in fields(TrainConfig)} >= set(_HF_KEY_NAMES.values())
