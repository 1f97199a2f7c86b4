"""ParallelDims: every bad layout is refused before any process group exists, naming the field."""

import re

import pytest

from workbench.errors import ConfigError
from workbench.job import ParallelSection
from workbench.models.llama3 import FLAVORS
from workbench.parallel.dims import ParallelDims


def dims(world: int, **degrees) -> ParallelDims:
    return ParallelDims.from_config(ParallelSection(**degrees), world, FLAVORS["debug"])


@pytest.mark.parametrize("world, degrees, field, expected", [
    (2, {}, "parallel.dp_replicate", "world size is 2"),
    (4, {"backend": "fsdp2", "dp_shard": 2}, "parallel.dp_replicate", "= 2, but the world size is 4"),
    (2, {"backend": "ddp", "dp_shard": 2}, "parallel.dp_shard", "does not compose with backend 'ddp'"),
    (2, {"backend": "zero2", "tp": 2}, "parallel.tp", "does not compose with backend 'zero2'"),
    (2, {"backend": "zero2", "cp": 2}, "parallel.cp", "does not compose with backend 'zero2' yet"),
    (4, {"backend": "fsdp2", "cp": 2, "tp": 2}, "parallel.cp", "with tensor parallel (2) is not built"),
    (8, {"backend": "fsdp2", "cp": 8, "cp_method": "ulysses"}, "parallel.cp", "must divide model.config.n_heads"),
    (2, {"backend": "single", "dp_shard": 2}, "parallel.dp_shard", "does not compose with backend 'single'"),
    (4, {"backend": "zero3", "dp_replicate": 2, "dp_shard": 2}, "parallel.dp_replicate", "one data-parallel group"),
    (3, {"backend": "fsdp2", "tp": 3}, "parallel.tp", "must divide model.config.n_heads"),
])
def test_bad_layouts_name_the_field(world, degrees, field, expected):
    with pytest.raises(ConfigError) as e:
        dims(world, **degrees)
    assert field in str(e.value)
    assert expected in str(e.value)


def test_kv_heads_divisibility():
    from dataclasses import replace

    cfg = replace(FLAVORS["debug"], n_heads=4, n_kv_heads=1)
    with pytest.raises(ConfigError, match=r"parallel.tp.*n_kv_heads = 1"):
        ParallelDims.from_config(ParallelSection(backend="fsdp2", tp=2), 2, cfg)


def test_sizes_and_ranks_of_a_good_layout():
    d = dims(8, backend="fsdp2", dp_replicate=2, dp_shard=2, tp=2)
    assert d.dp_size == 4 and d.describe() == "fsdp2 on 8 ranks (dp_replicate=2, dp_shard=2, tp=2)"
    # mesh order (dp_replicate, dp_shard, cp, tp): tp neighbours share data
    assert [d.dp_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert dims(1).describe() == "single on 1 rank"


def test_a_zero_run_resumes_only_under_the_same_backend_and_world(tmp_path, debug_job):
    from workbench.train.trainer import check_resumable

    zero2 = debug_job(tmp_path, "--parallel.backend", "zero2", "--parallel.dp_shard", "2")
    check_resumable(zero2, zero2, tmp_path)
    for other in (["--parallel.backend", "zero3", "--parallel.dp_shard", "2"],
                  ["--parallel.backend", "fsdp2", "--parallel.dp_shard", "2"]):
        with pytest.raises(ConfigError, match=r"'parallel.backend': .* was trained with zero2 on 2 rank"):
            check_resumable(zero2, debug_job(tmp_path, *other), tmp_path)
    fewer = debug_job(tmp_path, "--parallel.backend", "zero2", "--parallel.dp_shard", "1", "--train.micro_batch_size", "32")
    with pytest.raises(ConfigError, match=r"'parallel.dp_shard' / 'parallel.dp_replicate': .* zero2 on 2 rank\(s\), "
                                          r"this config asks for zero2 on 1"):
        check_resumable(zero2, fewer, tmp_path)
    with pytest.raises(ConfigError, match=r"trained with fsdp2 on 2 rank\(s\), this config asks for zero2 on 2"):
        check_resumable(debug_job(tmp_path, "--parallel.backend", "fsdp2", "--parallel.dp_shard", "2"), zero2, tmp_path)


def test_options_that_do_not_apply_are_refused_by_name(tmp_path, debug_job):
    with pytest.raises(ConfigError, match=r"'parallel.loss_parallel': needs parallel.tp > 1"):
        debug_job(tmp_path, "--parallel.loss_parallel", "true")
    with pytest.raises(ConfigError, match=r"'parallel.compile': does not compose with backend 'zero3' yet"):
        debug_job(tmp_path, "--parallel.backend", "zero3", "--parallel.compile", "true")
    with pytest.raises(ConfigError, match=r"'optim.momentum': is for optim.name = 'sgd'"):
        debug_job(tmp_path, "--optim.momentum", "0.9")
    for backend in ("ddp", "fsdp2", "zero1"):  # one process: nothing to split over, and no process group
        with pytest.raises(ConfigError, match=rf"'parallel.backend': '{backend}' needs several processes"):
            ParallelDims.from_config(debug_job(tmp_path, "--parallel.backend", backend).parallel, 1)


def test_the_deepspeed_config_comes_from_ours_with_a_user_json_merged_on_top(tmp_path, debug_job):
    from workbench.parallel.zero import deepspeed_config

    job = debug_job(tmp_path, "--parallel.backend", "zero3", "--parallel.dp_shard", "2", "--train.grad_accum", "2",
                    "--optim.name", "sgd", "--optim.momentum", "0.9")
    dims = ParallelDims.from_config(job.parallel, 2)
    ours = deepspeed_config(job, 3, dims, bf16=False)
    assert ours["train_batch_size"] == job.train.micro_batch_size * 2 * 2 and ours["managed_gradient_accumulation"] is False
    assert ours["optimizer"] == {"type": "SGD", "params": {"lr": job.optim.lr, "momentum": 0.9}}
    assert ours["zero_optimization"] == {"stage": 3, "overlap_comm": False} and ours["zero_allow_untested_optimizer"]
    assert "torch_autocast" not in ours
    assert deepspeed_config(job, 3, dims, bf16=True)["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    user = tmp_path / "ds.json"
    user.write_text('{"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}, "flops_profiler": {"enabled": false}}')
    job.parallel.deepspeed_config = str(user)
    merged = deepspeed_config(job, 3, dims, bf16=False)
    assert merged["zero_optimization"] == {"stage": 3, "overlap_comm": False, "reduce_bucket_size": 1000}
    assert merged["flops_profiler"] == {"enabled": False} and merged["optimizer"] == ours["optimizer"]
    for text, message in [('{"train_micro_batch_size_per_gpu": 99}', "sets 'train_micro_batch_size_per_gpu', which the run's config decides (set train.micro_batch_size instead)"),
                          ('{"bf16": {"enabled": true}}', "sets 'bf16', which the run's config decides (set run.precision instead)"),
                          ('{"optimizer": {"type": "Adam"}}', "(set the [optim] section instead)"),
                          ('{"gradient_clipping": 5}', "(set optim.grad_clip instead)"),
                          ('{"zero_optimization": {"stage": 1}}', "asks for ZeRO stage 1 but parallel.backend is 'zero3'"),
                          ('{"managed_gradient_accumulation": true}', "the trainer owns accumulation"),
                          ('{"scheduler": {"type": "WarmupLR"}}', "(set optim.schedule instead)"),
                          ("[1, 2]", "must hold a JSON object"), ("{not json", "is not JSON")]:
        user.write_text(text)
        with pytest.raises(ConfigError, match=r"'parallel.deepspeed_config': .*" + re.escape(message)):
            deepspeed_config(job, 3, dims, bf16=False)
    job.parallel.deepspeed_config = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="cannot read .*missing.json"):
        deepspeed_config(job, 3, dims, bf16=False)


def test_a_resume_may_change_the_layout_only_with_the_same_global_batch(tmp_path, debug_job):
    from workbench.train.trainer import check_resumable

    saved = debug_job(tmp_path, "--train.micro_batch_size", "4", "--train.grad_accum", "2")
    same = debug_job(tmp_path, "--train.micro_batch_size", "2", "--train.grad_accum", "2",
                     "--parallel.backend", "fsdp2", "--parallel.dp_shard", "2")
    check_resumable(saved, same, tmp_path)  # 4 x 2 x 1 = 2 x 2 x 2: allowed
    other = debug_job(tmp_path, "--train.micro_batch_size", "4", "--train.grad_accum", "2",
                      "--parallel.backend", "fsdp2", "--parallel.dp_shard", "2")
    with pytest.raises(ConfigError, match="global batch of 8 samples .* this config gives 16"):
        check_resumable(saved, other, tmp_path)
    with pytest.raises(ConfigError, match="'optim.lr'"):  # anything else still may not change
        check_resumable(saved, debug_job(tmp_path, "--train.micro_batch_size", "4", "--train.grad_accum", "2",
                                         "--optim.lr", "1e-2"), tmp_path)


def test_context_parallel_layouts_and_refusals(tmp_path, debug_job):
    d = dims(4, backend="fsdp2", dp_shard=2, cp=2)
    # cp ranks are neighbours (mesh order dp_replicate, dp_shard, cp, tp) and read the same data
    assert [d.dp_rank(r) for r in range(4)] == [0, 0, 1, 1] and [d.cp_rank(r) for r in range(4)] == [0, 1, 0, 1]
    assert dims(2, backend="ddp", cp=2, cp_method="ulysses").dp_size == 1
    assert dims(8, backend="fsdp2", cp=8).cp == 8  # ring has no head constraint
    from workbench.models.deepseek_v3 import FLAVORS as DEEPSEEK
    from workbench.models.mixtral import FLAVORS as MOE

    # a mixture of experts composes with cp (router sums reduced over dp x cp, per-sequence ones over cp), ep too
    assert ParallelDims.from_config(ParallelSection(backend="fsdp2", cp=2), 2, MOE["debug"]).cp == 2
    assert ParallelDims.from_config(ParallelSection(backend="fsdp2", cp=2, ep=2), 2, DEEPSEEK["kimi-k2-debug"]).ep == 2
    assert ParallelDims.from_config(ParallelSection(backend="ddp", cp=2), 2, DEEPSEEK["kimi-k2-debug"]).cp == 2
    # multi-token prediction reads token t + d from another rank's slice: refused by name
    assert DEEPSEEK["debug"].mtp_layers == 1
    with pytest.raises(ConfigError, match=r"'parallel.cp' and 'model.config.mtp_layers'.*mtp_layers = 1"):
        ParallelDims.from_config(ParallelSection(backend="fsdp2", cp=2), 2, DEEPSEEK["debug"])
    job = debug_job(tmp_path, "--model.family", "deepseek_v3", "--parallel.backend", "fsdp2", "--parallel.cp", "2")
    with pytest.raises(ConfigError, match=r"'model.config.mtp_layers'"):  # as the trainer checks a job's layout
        ParallelDims.from_config(job.parallel, 2, job.model.config)
    with pytest.raises(ConfigError, match=r"'data.seq_len': 64 must be divisible by 2 x parallel.cp = 6"):
        debug_job(tmp_path, "--parallel.backend", "fsdp2", "--parallel.cp", "3")
    with pytest.raises(ConfigError, match=r"parallel.cp_method"):
        debug_job(tmp_path, "--parallel.cp_method", "stripes")


def test_one_rank_layout_is_for_the_sharding_backends_only():
    dims = ParallelDims.one_rank("fsdp2")
    assert (dims.backend, dims.world_size, dims.dp_size) == ("fsdp2", 1, 1)
    assert ParallelDims.one_rank("zero2").backend == "zero2"
    for backend in ("single", "ddp", "zero4"):
        with pytest.raises(ConfigError, match=f"parallel.backend.*{backend}"):
            ParallelDims.one_rank(backend)
