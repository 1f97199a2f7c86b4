"""The config contract: TOML loading, dotted overrides, coercion, validation and the TOML round trip.

    dataclass defaults  <  TOML file (configs/...)  <  dotted overrides (--optim.lr 3e-4)

Every user mistake raises `ConfigError` whose message names the dotted key and what was expected.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from workbench.config import (
    CLIValue,
    apply_overrides,
    dumps_toml,
    flatten,
    from_dict,
    load_config,
    load_toml,
    parse_overrides,
    save_config,
    to_dict,
)
from workbench.errors import ConfigError, WorkbenchError
from workbench.job import JobConfig
from workbench.models import llama3
from workbench.models.base import ModelSection
from workbench.nn.rope import RopeConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
DEBUG = CONFIGS / "llama3" / "debug.toml"
DEMO = CONFIGS / "llama3" / "demo.toml"


def _config_files() -> list[Path]:
    return sorted(CONFIGS.rglob("*.toml"))


def _roundtrip(obj):
    """dumps_toml -> TOML text -> from_dict, as a saved run's config.toml is read back."""
    text = dumps_toml(obj)
    return from_dict(type(obj), tomllib.loads(text)), text


def _error(overrides, path=None, cls=JobConfig) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(cls, path, overrides)
    return str(info.value)


def _toml_error(tmp_path: Path, text: str) -> str:
    p = tmp_path / "bad.toml"
    p.write_text(text, encoding="utf-8")
    return _error(None, p)


# ----------------------------------------------------------------------------------------------------
# Every shipped config loads, and the resolved config round-trips through TOML


def test_there_are_configs_to_check():
    files = _config_files()
    assert DEBUG in files and DEMO in files


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_loads_and_round_trips(path: Path):
    if path.parent.name == "sweeps":  # `workbench sweep` files: every swept value is checked against the base
        from workbench.train.sweep import load_sweep

        sweep = load_sweep(path)
        assert sweep.n_trials() >= 1 and sweep.base.is_file()
        assert {d.key for d in sweep.space} == {k.rsplit(".", 1)[0] for k in flatten(load_toml(path)["space"])}
        return
    # `workbench fundamentals` configs, `workbench diffusion` ones (a [task] section), `workbench nerf` and
    # `workbench video` ones: the runner's own schema
    if (path.parent.name in ("fundamentals", "nerf", "video")
            or path.parent.name == "diffusion" and "task" in load_toml(path)):
        from workbench.train.fundamentals.runner import FundamentalsJob, load_job

        job = load_job(path)
        assert isinstance(job, FundamentalsJob)
        got = flatten(to_dict(job))
        for key, value in flatten(load_toml(path)).items():  # every value the file sets is what the job holds
            assert got[key] == value, key
        back, text = _roundtrip(job)
        assert back == job and dumps_toml(back) == text, text
        return
    job = load_config(JobConfig, path)
    assert isinstance(job, JobConfig)
    assert isinstance(job.model, ModelSection)
    raw = load_toml(path)
    # every value the file sets is what the loaded config holds
    for section, table in raw.items():
        if section == "model":
            continue
        for key, value in table.items():
            got = getattr(getattr(job, section), key)
            assert got == (tuple(value) if isinstance(got, tuple) else value), f"{section}.{key}"
    back, text = _roundtrip(job)
    assert back == job, text
    # and the dump is stable: dumping the reloaded config gives the same text
    assert dumps_toml(back) == text


def test_shipped_configs_hold_what_they_say():
    debug = load_config(JobConfig, DEBUG)
    assert (debug.run.name, debug.model.family, debug.model.flavor) == ("llama3-debug", "llama3", "debug")
    assert debug.model.config == llama3.FLAVORS["debug"]
    assert (debug.train.steps, debug.optim.warmup_steps, debug.data.seq_len) == (30, 5, 64)
    demo = load_config(JobConfig, DEMO)
    assert demo.model.flavor == "2M" and demo.model.config == llama3.FLAVORS["2M"]
    assert (demo.train.steps, demo.train.ckpt_every, demo.data.vocab_size) == (300, 100, 4096)


def test_defaults_round_trip():
    job = JobConfig()
    assert job.model.config == llama3.FLAVORS["debug"]
    assert from_dict(JobConfig, {}) == job
    back, _ = _roundtrip(job)
    assert back == job


def test_model_section_round_trip_with_nested_rope_table():
    job = load_config(JobConfig, None, ["--model.flavor", "8B", "--model.rope.factor", "16",
                                        "--model.n_layers=3"])
    cfg = job.model.config
    assert cfg.rope.scaling == "llama3" and cfg.rope.factor == 16.0
    text = dumps_toml(job)
    parsed = tomllib.loads(text)
    assert parsed["model"]["rope"]["factor"] == 16.0  # a nested [model.rope] table
    assert "[model.rope]" in text
    back, _ = _roundtrip(job)
    assert back == job
    assert back.model.config.rope == RopeConfig(theta=500000.0, scaling="llama3", factor=16.0,
                                                low_freq_factor=1.0, high_freq_factor=4.0,
                                                original_max_seq_len=8192)


def test_custom_flavor_starts_from_config_defaults_and_round_trips():
    section = ModelSection.of("llama3", "custom", dim=96, n_heads=6, n_kv_heads=3, head_dim=16,
                              rope={"theta": 1234.0, "scaling": "llama3", "factor": 2.0})
    defaults = llama3.Config()
    assert section.flavor == "custom"
    assert section.config.n_layers == defaults.n_layers  # untouched fields come from Config()
    assert section.config.vocab_size == defaults.vocab_size
    assert section.config.rope.theta == 1234.0 and section.config.rope.factor == 2.0
    assert section.config.rope.high_freq_factor == defaults.rope.high_freq_factor
    job = dataclasses.replace(JobConfig(), model=section)
    back, text = _roundtrip(job)
    assert back == job, text
    assert tomllib.loads(text)["model"]["flavor"] == "custom"
    # the section alone round-trips too
    assert ModelSection.from_config_dict(section.to_config_dict()) == section


def test_save_config_writes_a_loadable_file(tmp_path: Path):
    job = load_config(JobConfig, DEMO, ["--optim.betas", "[0.8, 0.9]", "--train.sample_prompt",
                                        'say "hi"\\n\tnow\r\x00'])
    out = tmp_path / "config.toml"
    save_config(job, out)
    assert load_config(JobConfig, out) == job
    assert load_config(JobConfig, out).train.sample_prompt == 'say "hi"\\n\tnow\r\x00'


@dataclasses.dataclass
class _WithOptional:
    limit: int | None = None
    name: str = "a"


def test_none_fields_are_left_out_of_the_dump_and_come_back_as_none():
    obj = _WithOptional()
    assert "limit" not in tomllib.loads(dumps_toml(obj)) and "limit" not in to_dict(obj)
    assert from_dict(_WithOptional, to_dict(obj)) == obj
    for text, expected in (("none", None), ("None", None), ("null", None), ("7", 7)):
        assert from_dict(_WithOptional, {"limit": CLIValue(text)}).limit == expected
    with pytest.raises(ConfigError, match="'limit': expected an integer or none"):
        from_dict(_WithOptional, {"limit": CLIValue("wide")})


# ----------------------------------------------------------------------------------------------------
# Layering: defaults < TOML < overrides


def test_toml_beats_defaults_and_unset_keys_keep_defaults():
    job = load_config(JobConfig, DEBUG)
    defaults = JobConfig()
    assert job.train.steps == 30 != defaults.train.steps
    assert job.optim.lr == 3e-3
    assert job.train.grad_accum == defaults.train.grad_accum  # not in the file
    assert job.optim.betas == defaults.optim.betas
    assert job.run.seed == defaults.run.seed


@pytest.mark.parametrize("overrides", [
    ["--optim.lr", "1e-3", "--train.steps=5", "model.n_layers=3"],
    {"optim.lr": CLIValue("1e-3"), "train.steps": CLIValue("5"), "model.n_layers": CLIValue("3")},
    {"optim.lr": 1e-3, "train.steps": 5, "model.n_layers": 3},  # typed values, as a sweep sets them
])
def test_overrides_beat_toml(overrides):
    job = load_config(JobConfig, DEBUG, overrides)
    assert job.optim.lr == 1e-3 and type(job.optim.lr) is float
    assert job.train.steps == 5 and type(job.train.steps) is int
    assert job.model.config.n_layers == 3
    # everything else still comes from the file / the flavor
    assert job.optim.warmup_steps == 5 and job.train.micro_batch_size == 8
    assert job.model.flavor == "debug"
    assert dataclasses.replace(job.model.config, n_layers=2) == llama3.FLAVORS["debug"]


def test_parse_overrides_forms():
    out = parse_overrides(["--optim.lr", "1e-3", "--train.steps=5", "model.n_layers=3",
                           "--optim.lr=2e-3", "--run.name", "a=b", "--model.rope.factor", "-8"])
    assert out == {"optim.lr": "2e-3", "train.steps": "5", "model.n_layers": "3", "run.name": "a=b",
                   "model.rope.factor": "-8"}
    assert all(isinstance(v, CLIValue) for v in out.values())
    assert parse_overrides([]) == {}


def test_later_override_wins():
    job = load_config(JobConfig, DEBUG, ["--train.steps", "7", "--train.steps=9"])
    assert job.train.steps == 9


def test_apply_overrides_copies_and_sets_nested_keys():
    raw = {"optim": {"lr": 1.0}, "model": {"rope": {"theta": 5.0}}}
    out = apply_overrides(raw, {"optim.lr": 2.0, "model.rope.factor": 4.0, "train.steps": 3})
    assert out == {"optim": {"lr": 2.0}, "model": {"rope": {"theta": 5.0, "factor": 4.0}},
                   "train": {"steps": 3}}
    assert raw == {"optim": {"lr": 1.0}, "model": {"rope": {"theta": 5.0}}}  # not mutated


def test_nested_model_override_keeps_the_flavors_other_fields():
    job = load_config(JobConfig, None, ["--model.flavor", "8B", "--model.rope.factor", "8.5"])
    flavor = llama3.FLAVORS["8B"]
    assert job.model.config.rope == dataclasses.replace(flavor.rope, factor=8.5)
    assert job.model.config.rope.scaling == "llama3" and job.model.config.rope.theta == 500000.0
    assert dataclasses.replace(job.model.config, rope=flavor.rope) == flavor
    # same through the TOML file's [model] table
    job = load_config(JobConfig, DEMO, ["--model.rope.theta", "20000"])
    assert job.model.config.rope == dataclasses.replace(llama3.FLAVORS["2M"].rope, theta=20000.0)
    assert job.model.config.dim == llama3.FLAVORS["2M"].dim


def test_flavor_override_replaces_the_files_flavor():
    job = load_config(JobConfig, DEBUG, ["--model.flavor", "2M"])
    assert job.model.flavor == "2M" and type(job.model.flavor) is str
    assert job.model.config == llama3.FLAVORS["2M"]
    job = load_config(JobConfig, DEBUG, ["--model.flavor", "custom", "--model.n_layers", "1"])
    assert job.model.config == dataclasses.replace(llama3.Config(), n_layers=1)


def test_model_table_in_toml_overrides_the_flavor(tmp_path: Path):
    p = tmp_path / "m.toml"
    p.write_text('[model]\nfamily = "llama3"\nflavor = "2M"\nn_layers = 6\n[model.rope]\ntheta = 1e5\n')
    job = load_config(JobConfig, p)
    assert job.model.config.n_layers == 6
    assert job.model.config.rope.theta == 1e5
    assert dataclasses.replace(job.model.config, n_layers=4, rope=llama3.FLAVORS["2M"].rope) == llama3.FLAVORS["2M"]
    assert load_config(JobConfig, p, ["model.n_layers=1"]).model.config.n_layers == 1


# ----------------------------------------------------------------------------------------------------
# Coercion of command-line strings


@pytest.mark.parametrize("text,expected", [
    ("true", True), ("false", False), ("1", True), ("0", False), ("True", True), ("FALSE", False),
    ("yes", True), ("off", False),
])
def test_bool_from_cli(text, expected):
    job = load_config(JobConfig, None, ["--model.tie_embeddings", text])
    assert job.model.config.tie_embeddings is expected


def test_false_string_is_false_not_truthy():
    job = load_config(JobConfig, None, {"model.tie_embeddings": CLIValue("false")})
    assert job.model.config.tie_embeddings is False


@pytest.mark.parametrize("override,get,expected", [
    (["--train.steps", "12"], lambda j: j.train.steps, 12),
    (["--data.max_bytes", "1_000_000"], lambda j: j.data.max_bytes, 1_000_000),
    (["--optim.lr", "3e-4"], lambda j: j.optim.lr, 3e-4),
    (["--optim.lr", "2"], lambda j: j.optim.lr, 2.0),
    (["--optim.min_lr_ratio", "0"], lambda j: j.optim.min_lr_ratio, 0.0),
    (["--run.device", "cpu"], lambda j: j.run.device, "cpu"),
    (["--optim.schedule=constant"], lambda j: j.optim.schedule, "constant"),
    (["--parallel.backend", "fsdp2"], lambda j: j.parallel.backend, "fsdp2"),
    (["--model.head_dim", "32"], lambda j: j.model.config.head_dim, 32),
    (["--model.head_dim", "0"], lambda j: j.model.config.hd, 16),
    (["--optim.betas", "[0.8, 0.9]"], lambda j: j.optim.betas, (0.8, 0.9)),
    (["--optim.betas", "[0, 0.5]"], lambda j: j.optim.betas, (0.0, 0.5)),
    (["--run.name", "123"], lambda j: j.run.name, "123"),
    (["--run.name", "true"], lambda j: j.run.name, "true"),
    (["--data.tokenizer", "1e3"], lambda j: j.data.tokenizer, "1e3"),
    (["--train.sample_prompt", ""], lambda j: j.train.sample_prompt, ""),
])
def test_cli_coercion(override, get, expected):
    value = get(load_config(JobConfig, DEBUG, override))
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(expected, tuple):
        assert all(type(v) is float for v in value)


def test_toml_int_is_accepted_for_float_and_becomes_float(tmp_path: Path):
    p = tmp_path / "c.toml"
    p.write_text("[optim]\nlr = 1\nbetas = [0, 0.5]\n")
    job = load_config(JobConfig, p)
    assert job.optim.lr == 1.0 and type(job.optim.lr) is float
    assert job.optim.betas == (0.0, 0.5) and isinstance(job.optim.betas, tuple)


# ----------------------------------------------------------------------------------------------------
# Errors: each names the dotted key and what was expected


def test_config_error_is_a_workbench_error():
    assert issubclass(ConfigError, WorkbenchError)


def test_unknown_top_level_key_lists_known_sections():
    msg = _error(["--optimizer.lr", "1e-3"])
    assert "'optimizer'" in msg and "unknown key" in msg
    for section in ("run", "model", "data", "optim", "train", "parallel", "objective"):
        assert section in msg


def test_unknown_top_level_key_in_toml(tmp_path: Path):
    msg = _toml_error(tmp_path, "steps = 10\n")
    assert "config key 'steps'" in msg and "unknown key" in msg and "train" in msg


def test_unknown_key_in_section_lists_known_keys():
    msg = _error(["--optim.learning_rate", "1e-3"])
    assert "config key 'optim.learning_rate'" in msg and "unknown key" in msg
    for key in ("lr", "warmup_steps", "betas", "weight_decay", "grad_clip"):
        assert key in msg


def test_unknown_key_in_section_from_toml(tmp_path: Path):
    msg = _toml_error(tmp_path, "[train]\nstep = 10\n")
    assert "config key 'train.step'" in msg and "steps" in msg


def test_unknown_model_field():
    msg = _error(["--model.n_layer", "3"], DEBUG)
    assert "config key 'model.n_layer'" in msg and "unknown key" in msg
    assert "n_layers" in msg and "n_kv_heads" in msg


def test_unknown_nested_model_field():
    msg = _error(["--model.rope.facter", "3"], DEBUG)
    assert "config key 'model.rope.facter'" in msg and "factor" in msg


def test_unknown_flavor_lists_known_flavors():
    msg = _error(["--model.flavor", "7B"], DEBUG)
    assert "config key 'model.flavor'" in msg and "'7B'" in msg
    for flavor in [*llama3.FLAVORS, "custom"]:
        assert flavor in msg


@pytest.mark.parametrize("value", [[1], {"a": 1}, 3])
def test_non_string_flavor(value):
    msg = _error({"model.flavor": value})
    assert "config key 'model.flavor'" in msg and "string" in msg


def test_unknown_family():
    msg = _error(["--model.family", "gpt5"], DEBUG)
    assert "config key 'model.family'" in msg and "'gpt5'" in msg and "llama3" in msg


def test_model_section_must_be_a_table(tmp_path: Path):
    msg = _toml_error(tmp_path, 'model = "llama3"\n')
    assert "config key 'model'" in msg and "table" in msg


@pytest.mark.parametrize("text,key,expected", [
    ('[train]\nsteps = "ten"\n', "train.steps", "an integer"),
    ("[train]\nsteps = 10.5\n", "train.steps", "an integer"),
    ("[train]\nsteps = true\n", "train.steps", "an integer"),
    ('[optim]\nlr = "3e-4"\n', "optim.lr", "a number"),
    ("[optim]\nlr = true\n", "optim.lr", "a number"),
    ("[run]\nname = 5\n", "run.name", "a string"),
    ('[model]\ntie_embeddings = "false"\n', "model.tie_embeddings", "a boolean"),
    ("[model]\ntie_embeddings = 0\n", "model.tie_embeddings", "a boolean"),
    ('[optim]\nbetas = "0.9"\n', "optim.betas", "a list"),
    ('[optim]\nbetas = [0.9, "x"]\n', "optim.betas[1]", "a number"),
    ("run = 5\n", "run", "a table"),
    ('[model]\nrope = 5\n', "model.rope", "a table"),
])
def test_wrong_type_in_toml(tmp_path: Path, text, key, expected):
    msg = _toml_error(tmp_path, text)
    assert f"config key '{key}'" in msg
    assert f"expected {expected}" in msg


@pytest.mark.parametrize("override,key,expected", [
    (["--train.steps", "true"], "train.steps", "an integer"),
    (["--train.steps", "ten"], "train.steps", "an integer"),
    (["--train.steps", "1.5"], "train.steps", "an integer"),
    (["--optim.lr", "fast"], "optim.lr", "a number"),
    (["--model.tie_embeddings", "maybe"], "model.tie_embeddings", "a boolean"),
    (["--model.tie_embeddings", "2"], "model.tie_embeddings", "a boolean"),
    (["--model.head_dim", "wide"], "model.head_dim", "an integer"),
    (["--train.steps", "none"], "train.steps", "an integer"),
    (["--optim.betas", "0.9"], "optim.betas", "a list"),
    (["--optim.betas", "[0.8"], "optim.betas", "lists look like"),
    (["--optim.betas", "[0.8, 0.9, 0.99]"], "optim.betas", "2 items"),
    (["--model.rope", "8"], "model.rope", "a table"),
])
def test_wrong_type_on_cli(override, key, expected):
    msg = _error(override, DEBUG)
    assert f"config key '{key}'" in msg
    assert expected in msg


@dataclasses.dataclass
class _Words:
    names: list[str] = dataclasses.field(default_factory=list)
    sizes: list[int] = dataclasses.field(default_factory=list)


@pytest.mark.parametrize("text,want", [("a,b", ["a", "b"]), ("[a, b]", ["a", "b"]), ('["a", "b"]', ["a", "b"]),
                                       ("a", ["a"]), ("[]", [])])
def test_a_list_of_strings_may_be_given_bare_on_the_cli(text, want):
    assert from_dict(_Words, {"names": CLIValue(text)}).names == want


def test_other_lists_still_need_toml_on_the_cli():
    assert from_dict(_Words, {"sizes": CLIValue("[1, 2]")}).sizes == [1, 2]
    with pytest.raises(ConfigError, match="config key 'sizes': could not parse '1,x'"):
        from_dict(_Words, {"sizes": CLIValue("1,x")})


def test_bool_given_to_int_field():
    msg = _error({"train.steps": True})
    assert "config key 'train.steps'" in msg and "expected an integer" in msg and "True" in msg
    msg = _error({"run.seed": False})
    assert "config key 'run.seed'" in msg and "expected an integer" in msg


@pytest.mark.parametrize("override,key,expected", [
    (["--optim.lr", "-1"], "optim.lr", "> 0"),
    (["--optim.lr", "0"], "optim.lr", "> 0"),
    (["--train.steps", "0"], "train.steps", "> 0"),
    (["--run.seed", "-1"], "run.seed", ">= 0"),
    (["--optim.min_lr_ratio", "1.5"], "optim.min_lr_ratio", "<= 1"),
    (["--data.vocab_size", "100"], "data.vocab_size", ">= 268"),
    (["--model.n_layers", "0"], "model.n_layers", "> 0"),
    (["--model.head_dim", "-1"], "model.head_dim", ">= 0"),
    (["--model.rope.factor", "0.5"], "model.rope.factor", ">= 1.0"),
    (["--optim.betas", "[0.9, 1.0]"], "optim.betas[1]", "[0, 1)"),
])
def test_out_of_range(override, key, expected):
    msg = _error(override, DEBUG)
    assert f"config key '{key}'" in msg
    assert expected in msg
    assert "got " in msg  # and says what it got


def test_out_of_range_in_toml(tmp_path: Path):
    msg = _toml_error(tmp_path, "[optim]\nlr = -1\n")
    assert msg == "config key 'optim.lr': expected a number > 0, got -1.0"
    msg = _toml_error(tmp_path, "[train]\nsteps = 0\n")
    assert msg == "config key 'train.steps': expected an integer > 0, got 0"


@pytest.mark.parametrize("override,key,choices", [
    (["--run.device", "gpu"], "run.device", ("'auto'", "'cpu'", "'cuda'")),
    (["--run.precision", "fp16"], "run.precision", ("'fp32'", "'bf16'")),
    (["--optim.schedule", "linear"], "optim.schedule", ("'constant'", "'cosine'")),
    (["--parallel.backend", "megatron"], "parallel.backend", ("'single'", "'fsdp2'", "'zero3'")),
    (["--model.attn_backend", "flash"], "model.attn_backend", ("'sdpa'", "'math'")),
    (["--model.rope.scaling", "rescaled"], "model.rope.scaling", ("'default'", "'ntk'", "'longrope'")),
    (["--objective.name", "reinforce"], "objective.name", ("'lm'", "'dpo'", "'ppo'", "'grpo'")),
    (["--run.device", "CPU"], "run.device", ("'cpu'",)),
])
def test_literal_outside_choices(override, key, choices):
    msg = _error(override, DEBUG)
    assert f"config key '{key}'" in msg and "expected one of" in msg
    assert repr(override[1]) in msg
    for choice in choices:
        assert choice in msg


def test_literal_in_toml_must_be_a_string_choice(tmp_path: Path):
    msg = _toml_error(tmp_path, "[optim]\nschedule = 1\n")
    assert "config key 'optim.schedule'" in msg and "one of 'constant', 'cosine'" in msg


def test_cross_field_kv_heads_must_divide_heads():
    msg = _error(["--model.n_kv_heads", "3"], DEBUG)  # debug has n_heads = 4
    assert "config key 'model.n_kv_heads'" in msg
    assert "must divide n_heads (4)" in msg and "got 3" in msg


def test_cross_field_heads_must_divide_dim():
    msg = _error(["--model.n_heads", "3", "--model.n_kv_heads", "1"], DEBUG)  # dim 64
    assert "config key 'model.n_heads'" in msg and "must divide dim (64)" in msg
    # a head_dim lifts the rule
    job = load_config(JobConfig, DEBUG, ["--model.n_heads", "3", "--model.n_kv_heads", "1",
                                         "--model.head_dim", "16"])
    assert job.model.config.hd == 16


def test_cross_field_rope_validation_is_prefixed():
    msg = _error(["--model.flavor", "8B", "--model.rope.high_freq_factor", "0.5"])
    assert "config key 'model.rope.high_freq_factor'" in msg and "low_freq_factor" in msg


def test_a_run_shorter_than_its_warmup_is_allowed():
    # a smoke run of a config with a long warmup: the lr just never reaches its peak
    assert load_config(JobConfig, DEBUG, ["--train.steps", "2"]).optim.warmup_steps == 5


@pytest.mark.parametrize("args", [
    ["--optim.lr"],                 # missing value
    ["--train.steps", "5", "--optim.lr"],
    ["optim.lr"],                   # bare token without '='
    ["optim.lr", "1e-3"],
    ["--lr", "1e-3"],               # no dot
    ["lr=1e-3"],
    ["--optim..lr=1"],              # empty part
    ["--.lr=1"],
    ["--optim.=1"],
])
def test_malformed_override_token(args):
    with pytest.raises(ConfigError) as info:
        parse_overrides(args)
    msg = str(info.value)
    assert msg.startswith("override '")
    assert "expected" in msg
    with pytest.raises(ConfigError):
        load_config(JobConfig, DEBUG, args)


def test_malformed_override_message_names_the_token():
    with pytest.raises(ConfigError, match=r"override '--lr'.*dotted key"):
        parse_overrides(["--lr", "1"])
    with pytest.raises(ConfigError, match=r"override '--optim.lr'.*--section.key value"):
        parse_overrides(["--optim.lr"])


def test_empty_override_value_is_a_type_error_naming_the_key():
    msg = _error(["--optim.lr="], DEBUG)
    assert "config key 'optim.lr'" in msg and "expected a number" in msg


@pytest.mark.parametrize("path", [DEMO, DEBUG, None])
def test_key_below_a_scalar(path):
    msg = _error(["--run.seed.x", "1"], path)
    assert "config key 'run.seed'" in msg


def test_key_below_a_scalar_set_in_the_file():
    # demo.toml sets run.seed, so the override walks through a value
    msg = _error(["--run.seed.x", "1"], DEMO)
    assert msg == "config key 'run.seed': is a value, not a table, so 'run.seed.x' cannot be set"
    msg = _error(["--model.flavor.x", "1"], DEMO)
    assert "config key 'model.flavor'" in msg and "not a table" in msg


def test_invalid_toml_names_the_file(tmp_path: Path):
    p = tmp_path / "broken.toml"
    p.write_text("[optim\nlr = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(JobConfig, p)
    msg = str(info.value)
    assert str(p) in msg and "invalid TOML" in msg


def test_non_utf8_file_names_the_file(tmp_path: Path):
    p = tmp_path / "latin1.toml"
    p.write_bytes(b'[run]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_config(JobConfig, p)
    assert str(p) in str(info.value)


def test_missing_file(tmp_path: Path):
    p = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(JobConfig, p)
    assert str(p) in str(info.value) and "not found" in str(info.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(JobConfig, tmp_path)  # a directory is not a config file


# ----------------------------------------------------------------------------------------------------
# Non-finite floats


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "NaN", "Infinity"])
def test_non_finite_float_on_cli_is_rejected(text):
    msg = _error(["--optim.lr", text], DEBUG)
    assert "config key 'optim.lr'" in msg and "finite" in msg


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_float_in_toml_is_rejected(tmp_path: Path, value):
    msg = _toml_error(tmp_path, f"[optim]\nweight_decay = {value}\n")
    assert "config key 'optim.weight_decay'" in msg and "finite" in msg


def test_non_finite_float_inside_a_tuple_is_rejected():
    msg = _error(["--optim.betas", "[0.9, nan]"], DEBUG)
    assert "config key 'optim.betas[1]'" in msg and "finite" in msg


# ----------------------------------------------------------------------------------------------------
# The CLI refuses a bad config before doing any work


def test_cli_refuses_a_bad_config_before_any_work(tmp_path: Path):
    out_dir = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "train", str(DEBUG), "--optim.lr", "-1",
         "--run.out_dir", str(out_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    assert "optim.lr" in lines[0] and "> 0" in lines[0]
    assert proc.stdout == ""
    assert not out_dir.exists()
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------
# objective.loss_chunk: an option of lm and sft only


def test_loss_chunk_belongs_to_lm_and_sft_and_defaults_to_whole_logits(tmp_path: Path):
    assert load_config(JobConfig, DEBUG, []).objective.loss_chunk == 0  # every existing config: unchanged
    assert load_config(JobConfig, DEBUG, ["--objective.loss_chunk", "4096"]).objective.loss_chunk == 4096
    chat = tmp_path / "chat.jsonl"
    chat.write_text("")
    job = load_config(JobConfig, DEBUG, ["--objective.name", "sft", "--data.train_file", str(chat),
                                         "--objective.loss_chunk", "512"])
    assert job.objective.loss_chunk == 512
    assert _error(["--objective.loss_chunk", "-1"], DEBUG) == \
        "config key 'objective.loss_chunk': expected an integer >= 0, got -1"
    for name, extra in (("dpo", ["--objective.reference", "x"]), ("distill", ["--objective.teacher", "x"]),
                        ("grpo", []), ("ppo", []), ("vlm", [])):
        msg = _error(["--objective.name", name, *extra, "--objective.loss_chunk", "64"], DEBUG)
        assert msg.startswith("config key 'objective.loss_chunk': is an option of objective.name = 'lm' or 'sft'")
        assert f"objective.name is '{name}'" in msg


def test_a_run_resumes_with_another_loss_chunk(tmp_path: Path):
    from workbench.train.trainer import check_resumable

    whole = load_config(JobConfig, DEBUG, [])
    check_resumable(whole, load_config(JobConfig, DEBUG, ["--objective.loss_chunk", "256"]), tmp_path)


@pytest.mark.parametrize("loss_parallel", ["true", "false"])
def test_loss_chunk_with_tensor_parallel_is_refused_by_both_keys(loss_parallel):
    msg = _error(["--objective.loss_chunk", "64", "--parallel.backend", "fsdp2", "--parallel.tp", "2",
                  "--parallel.loss_parallel", loss_parallel], DEBUG)
    assert msg.startswith("config key 'objective.loss_chunk':")
    assert ("parallel.loss_parallel" if loss_parallel == "true" else "parallel.tp > 1") in msg
    load_config(JobConfig, DEBUG, ["--parallel.backend", "fsdp2", "--parallel.tp", "2",
                                   "--parallel.loss_parallel", loss_parallel])  # without a chunk: as before
