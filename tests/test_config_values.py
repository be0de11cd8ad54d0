"""Every config value is checked before a command does any work (issue 25, item 1).

The rules sit beside the defaults in gemma_jax/config.py; these tests make sure every key has
one, that each ranged key refuses a bad value with one line naming the key, the value and the
rule, and that the command lines refuse before they write anything.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest

from gemma_jax import config as config_lib, config_rules
from gemma_jax.config_rules import ConfigValueError

REPO = Path(__file__).resolve().parents[1]
LEGAL = str(REPO / "configs" / "legal.py")
NAN, INF = float("nan"), float("inf")

# key -> values its rule must refuse. Every key whose rule refuses anything is listed (checked
# below), so a new ranged key needs a row here.
INVALID = {
    "model.preset": ["gemma2_huge", "Gemma2_2b", 3],
    "model.init_checkpoint": ["weights\n/x", None],
    "model.dtype": ["fp32", "float64"],
    "model.param_dtype": ["int8", ""],
    "model.remat": ["partial", True],
    "model.scan_layers": ["yes", 1],
    "model.attention_impl": ["cudnn", "flash"],
    "model.num_layers": [0, -2, 2.5, True],
    "model.embed_dim": [0, -64],
    "model.hidden_dim": [0, -1],
    "model.num_heads": [0, -4],
    "model.num_kv_heads": [0, -1],
    "model.head_dim": [0, 15, -16],
    "model.vocab_size": [0, -1],
    "model.sliding_window": [0, -8],
    "model.query_pre_attn_scalar": [0.0, -1.0, NAN, INF],
    "model.attn_softcap": [-1.0, NAN, INF],
    "model.final_softcap": [-0.5, NAN],
    "data.train": ["a.jsonl:0.5,b.jsonl", "a.jsonl:0,b.jsonl:0", 7],
    "data.eval": ["x.jsonl:1,y.jsonl"],
    "data.eval_fraction": [-0.1, 1.0, 1.5, NAN],
    "data.tokenizer": ["tok\0.model"],
    "data.seq_len": [0, -512, 1],
    "data.packing": ["true", 0],
    "data.overlong": ["truncated", "keep"],
    "data.train_on_prompt": [None],
    "data.skip_invalid": ["no"],
    "data.field_map": ["input", "nonsense=text"],
    "data.text_split": ["lines", "sentence"],
    "data.num_epochs": [-1],
    "data.tfds_data_dir": ["a\nb"],
    "data.cache_dir": ["c\0"],
    "data.verify_cache": ["hash", "Full", ""],
    "data.num_workers": [-1, 1.5],
    "data.input_workers": [-2],
    "train.steps": [-1, -300, 2.5],
    "train.batch_size": [0, -8],
    "train.grad_accum": [0, -1],
    "train.log_every": [0, -10],
    "train.eval_every": [-1],
    "train.eval_batches": [-5],
    "train.seed": [-1, 0.5],
    "train.loss_chunk": [0, -1024],
    "train.export_format": ["safetensors", "HF", "gguff"],
    "train.progress": ["on"],
    "train.objective": ["ppo", "DPO", ""],
    "train.allow_changes": [1],
    "train.max_nonfinite_steps": [0, -5],
    "dpo.beta": [0.0, -0.1, NAN, INF],
    "dpo.loss": ["hinge", "sigmoid "],
    "dpo.label_smoothing": [-0.1, 0.5, 0.9, NAN],
    "dpo.precompute_reference": ["false"],
    "dpo.sft_weight": [-0.5, NAN, INF],
    "orpo.lambda": [0.0, -1.0, INF],
    "simpo.beta": [0.0, -2.0, NAN],
    "simpo.gamma": [-0.5, INF],
    "grpo.group_size": [1, 0, -4, 2.5],
    "grpo.max_new_tokens": [0, -1],
    "grpo.temperature": [0.0, -1.0, NAN],
    "grpo.top_p": [0.0, 1.5, NAN],
    "grpo.beta": [-0.1, INF],
    "grpo.epsilon": [0.0, 1.0, -0.2],
    "grpo.epsilon_high": [-0.1, NAN],
    "grpo.num_iterations": [0, -1],
    "grpo.loss_type": ["ppo", "GRPO"],
    "grpo.scale_rewards": ["std", ""],
    "grpo.format_regex": ["(unclosed"],
    "grpo.code_timeout": [0.0, -1.0, NAN],
    "grpo.log_rollouts_every": [-1],
    "grpo.log_rollouts": [0, -2],
    "opt.lr": [0.0, -1e-3, NAN, INF, -INF],
    "opt.schedule": ["cosin", "exponential", ""],
    "opt.warmup_steps": [-1, 2.5],
    "opt.min_lr_ratio": [-0.1, 1.5, NAN],
    "opt.weight_decay": [-0.01, NAN, INF],
    "opt.b1": [-0.1, 1.0, 1.1, NAN],
    "opt.b2": [1.0, -0.5, INF],
    "opt.eps": [0.0, -1e-8, NAN],
    "opt.grad_clip": [-1.0, NAN],
    "opt.decay_embeddings": ["yes"],
    "opt.decay_norms": [None],
    "mesh.data": [0, -2],
    "mesh.fsdp": [0, -3, 1.5],
    "mesh.tensor": [0, -4],
    "mesh.rules": [(("embed", "model"),), (("heads", ("tensor", "pipeline")),), ((3, None),)],
    "lora.rank": [-1, -16, 4.0],
    "lora.alpha": [0.0, -16.0, NAN],
    "lora.dropout": [-0.1, 1.0, NAN],
    "lora.targets": ["attn/(q_einsum", "[unclosed"],
    "lora.quantize": ["int2", "nf4", ""],
    "lora.base_dtype": ["float8"],
    "eval.task": ["summarisation", "chat"],
    "eval.metric": ["rougeL", "accuracy"],
    "eval.general": ["a\nb"],
    "eval.forgetting_threshold": [-0.1, NAN],
    "eval.max_examples": [-1],
    "eval.max_new_tokens": [0, -128],
    "eval.temperature": [-0.7, NAN, INF],
    "eval.in_training": ["false"],
    "checkpoint.every_steps": [0, -500],
    "checkpoint.keep": [0, -2],
    "checkpoint.async_save": ["yes"],
}

# Values at the edge of a range that must still pass.
VALID_EDGES = {
    "opt.b1": 0.0, "opt.grad_clip": 0.0, "opt.weight_decay": 0.0, "opt.min_lr_ratio": 1.0, "opt.warmup_steps": 0,
    "lora.dropout": 0.0, "lora.rank": 0, "data.eval_fraction": 0.0, "mesh.fsdp": -1, "mesh.tensor": 1,
    "model.head_dim": None, "model.attn_softcap": 0.0, "train.eval_every": 0, "dpo.label_smoothing": 0.49,
    "data.train": "a.jsonl:0.8,b.jsonl:0.2", "data.field_map": "input=text,output=summary",
    "model.num_layers": 1, "eval.temperature": 0.0, "train.export_format": "", "data.seq_len": 2,
    "train.steps": 0, "dpo.sft_weight": 0.0, "grpo.group_size": 2, "grpo.top_p": 1.0,
    "grpo.epsilon_high": None, "grpo.format_regex": "",
}


def _tiny_dict() -> dict:
    """configs/legal.py:tiny as plain nested dicts (so a test can set any type, not only the key's)."""
    return config_lib.load(f"{LEGAL}:tiny").to_dict()


def _set(cfg: dict, key: str, value) -> dict:
    out = copy.deepcopy(cfg)
    section, name = key.split(".")
    out[section][name] = value
    return out


def _refusal(cfg, argv=None) -> str:
    with pytest.raises(ConfigValueError) as e:
        config_lib.validate(cfg, argv=argv)
    message = str(e.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- every key has a rule


def test_every_key_has_a_rule_and_every_default_passes_it():
    rules = config_lib.rules()
    keys = config_lib.flat_keys(config_lib.base_config())
    assert sorted(keys) == sorted(rules), "a key without a rule, or a rule without a key"
    config_lib.validate(config_lib.base_config())


def test_every_refusing_rule_is_exercised_by_the_table():
    """Only free-text keys have nothing to refuse; every other key needs a row in INVALID."""
    rules = config_lib.rules()
    free = {k for k, r in rules.items() if r is config_rules.TEXT}
    # Free text checked where it is used: grpo.rewards / reward_weights are loaded and checked with the
    # reward functions before step 1 (tests/test_grpo.py), the two field names against the data.
    assert free == {"data.default_instruction", "grpo.rewards", "grpo.reward_weights", "grpo.answer_field",
                    "grpo.tests_field"}, "a new free-text key: say why it needs no range"
    assert sorted(INVALID) == sorted(set(rules) - free)


def test_a_key_declared_without_a_rule_fails_loudly(monkeypatch):
    real = config_lib._declarations

    def with_plain_key():
        sections = real()
        sections["dpo"] = {**sections["dpo"], "sft_weight": 0.0}  # as a new key written the old way
        return sections

    monkeypatch.setattr(config_lib, "_declarations", with_plain_key)
    with pytest.raises(TypeError, match=r"dpo\.sft_weight has no value rule"):
        config_lib.base_config()


@pytest.mark.parametrize("name", ["legal", "code", "creative", "medical", "translation", "preference"])
def test_every_shipped_config_variant_is_valid(name):
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for variant in ("tiny", "2b", "9b", "27b", "2b_lora", "9b_lora", "27b_lora", "27b_qlora"):
        config_lib.validate(module.get_config(variant))


def test_sets_listed_in_config_match_their_owners():
    from gemma_jax import weights
    from gemma_jax.eval import metrics, tasks
    from gemma_jax.model.config import ModelConfig
    from gemma_jax.train import grpo, objectives

    assert config_lib.OBJECTIVES == tuple(objectives.OBJECTIVES)
    assert config_lib.GRPO_LOSSES == grpo.LOSS_TYPES and config_lib.GRPO_SCALES == grpo.SCALE_REWARDS
    assert config_lib.DPO_LOSSES == tuple(objectives.DPO_LOSSES)
    assert config_lib.EVAL_TASK_METRICS == dict(metrics.TASK_METRICS)
    assert config_lib.LOSS_METRICS == tasks.LOSS_METRICS
    assert config_lib.rules()["train.export_format"].ok(weights.SAVE_FORMATS[0])
    for dtype in config_lib.DTYPES:
        ModelConfig.from_preset("gemma2_test", dtype=dtype, param_dtype=dtype)


# ----------------------------------------------------------------------------- every ranged key refuses


@pytest.mark.parametrize("key", sorted(INVALID))
def test_an_invalid_value_is_one_line_naming_key_value_and_rule(key):
    base = _tiny_dict()
    rule = config_lib.rules()[key]
    for value in INVALID[key]:
        message = _refusal(_set(base, key, value))
        assert message.startswith(f"{key}="), message
        assert f"must be {rule.text}" in message, message
        if isinstance(value, float):
            assert str(value) in message.split(":")[0], message  # nan, inf, -0.001 as written
        elif isinstance(value, str) and "\n" not in value and "\0" not in value:
            assert repr(value) in message, message


@pytest.mark.parametrize("key", sorted(VALID_EDGES))
def test_values_at_the_edge_of_a_range_pass(key):
    config_lib.validate(_set(_tiny_dict(), key, VALID_EDGES[key]))


def test_messages_read_as_a_person_would_write_them():
    cfg = config_lib.load(f"{LEGAL}:tiny")
    cfg.opt.lr = -1e-3
    assert _refusal(cfg) == "opt.lr=-0.001: must be > 0"
    cfg = config_lib.load(f"{LEGAL}:tiny")
    cfg.opt.lr = float("nan")
    assert _refusal(cfg) == "opt.lr=nan: must be > 0 and finite"
    cfg = config_lib.load(f"{LEGAL}:tiny")
    cfg.opt.schedule = "cosin"
    assert _refusal(cfg) == "opt.schedule='cosin': must be one of cosine, linear, constant"
    # On the command line the flag is quoted as typed, with the value it was read as.
    cfg = config_lib.load(f"{LEGAL}:tiny")
    cfg.opt.lr = -1e-3
    assert _refusal(cfg, argv=["prog", "--config.opt.lr=-1e-3"]) == "--config.opt.lr=-1e-3 (read as -0.001): must be > 0"
    cfg = config_lib.load(f"{LEGAL}:tiny")
    cfg.train.steps = -5
    assert _refusal(cfg, argv=["prog", "--config.train.steps=-5"]) == "--config.train.steps=-5: must be an integer >= 0"
    cfg = config_lib.load(f"{LEGAL}:tiny")
    cfg.data.train = "a.jsonl:0.5,b.jsonl"
    assert "'b.jsonl' has no weight" in _refusal(cfg)  # the parser's own reason is kept


CROSS = [
    (dict(**{"train.batch_size": 10, "train.grad_accum": 4}), "train.batch_size must be a multiple of train.grad_accum"),
    (dict(**{"model.num_heads": 6, "model.num_kv_heads": 4}), "model.num_heads must be a multiple of model.num_kv_heads"),
    (dict(**{"model.preset": "", "model.num_layers": 2}), "model.embed_dim, model.hidden_dim"),
    (dict(**{"eval.task": "translation", "eval.metric": "rouge_l"}), "not reported for eval.task='translation'"),
    (dict(**{"mesh.data": -1, "mesh.fsdp": -1}), "at most one mesh axis may be -1"),
    (dict(**{"dpo.loss": "ipo", "dpo.label_smoothing": 0.1}), "dpo.label_smoothing applies to dpo.loss='sigmoid'"),
    (dict(**{"lora.rank": 8, "lora.targets": ""}), "lora.targets is empty"),
]


@pytest.mark.parametrize("values,expect", CROSS, ids=[e[:30] for _, e in CROSS])
def test_cross_key_rules(values, expect):
    cfg = _tiny_dict()
    for key, value in values.items():
        cfg = _set(cfg, key, value)
    message = _refusal(cfg)
    assert expect in message, message
    first = next(iter(values))
    assert f"{first}=" in message, message  # the keys involved are named with their values


def test_an_empty_preset_with_every_dim_given_passes():
    cfg = _set(_tiny_dict(), "model.preset", "")
    for key, value in dict(num_layers=2, embed_dim=64, hidden_dim=128, num_heads=4, num_kv_heads=2,
                           head_dim=16).items():
        cfg = _set(cfg, f"model.{key}", value)
    config_lib.validate(cfg)


# ----------------------------------------------------------------------------- the command lines


def test_train_refuses_a_negative_lr_before_the_workdir_gets_any_file(tmp_path, capsys):
    from gemma_jax.train import __main__ as train_main

    wd = tmp_path / "wd"
    with pytest.raises(SystemExit) as e:
        train_main.run([f"--config={LEGAL}:tiny", f"--workdir={wd}", "--config.opt.lr=-1e-3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == ["error: --config.opt.lr=-1e-3 (read as -0.001): must be > 0"], err
    assert "Traceback" not in err
    assert not wd.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command,argv", [
    ("prepare", ["--config.lora.dropout=1.0"]),
    ("memory", ["--config.eval.temperature=-1"]),
    ("evaluate", ["--checkpoint=.", "--output=OUT", "--config.checkpoint.keep=0"]),
    ("train", ["--show_config", "--config.model.num_layers=0"]),
])
def test_every_command_with_a_config_checks_it(command, argv, tmp_path, capsys):
    import gemma_jax.evaluate
    import gemma_jax.memory
    import gemma_jax.prepare
    from gemma_jax.train import __main__ as train_main

    run = {"prepare": gemma_jax.prepare.run, "memory": gemma_jax.memory.main, "evaluate": gemma_jax.evaluate.main,
           "train": train_main.run}[command]
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    with pytest.raises(SystemExit) as e:
        run([f"--config={LEGAL}:tiny", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    key = argv[-1].split("=")[0][len("--config."):]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"--config.{key}=" in lines[0] and "must be" in lines[0], err
    assert not (tmp_path / "out").exists()


def test_python_entry_points_check_too(tmp_path):
    from gemma_jax import prepare, train

    cfg = config_lib.load(f"{LEGAL}:tiny")
    cfg.train.log_every = 0
    with pytest.raises(ConfigValueError, match=r"train\.log_every=0: must be an integer >= 1"):
        train.run(cfg, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()
    cfg = config_lib.load(f"{LEGAL}:tiny")
    cfg.data.overlong = "wrap"
    with pytest.raises(ConfigValueError, match="data.overlong='wrap'"):
        prepare.prepare(cfg)


def test_show_config_prints_each_keys_rule(capsys):
    from gemma_jax.train import __main__ as train_main

    assert train_main.run([f"--config={LEGAL}:tiny", "--show_config"]) == 0
    lines = {line.split(" = ")[0]: line for line in capsys.readouterr().out.splitlines() if " = " in line}
    assert "[> 0]" in lines["opt.lr"] and "# peak learning rate" in lines["opt.lr"]
    assert "[in [0, 1)]" in lines["opt.b2"] and "[one of cosine, linear, constant]" in lines["opt.schedule"]
    assert "[an integer >= 1]" in lines["train.batch_size"]
    assert all("[" in line for line in lines.values()), [k for k, v in lines.items() if "[" not in v]


def test_shipped_rl_variants_are_valid():
    spec = importlib.util.spec_from_file_location("rl_config", REPO / "configs" / "rl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for variant in ("tiny_sft", "tiny", "gemma3_270m", "2b_lora", "9b_lora"):
        config_lib.validate(module.get_config(variant))
