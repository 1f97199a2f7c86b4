"""`workbench sweep` without a Ray cluster: the sweep file's checks, the results it writes from trial folders
(table, plots, best.toml), the resume guard, the validation listener trials report through, and the check
that refuses a Ray that listens beyond this machine."""

import csv
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray (the ray extra, in dev) is not installed")

from workbench.config import dumps_toml, load_config, load_toml  # noqa: E402
from workbench.errors import ConfigError, WorkbenchError  # noqa: E402
from workbench.job import JobConfig  # noqa: E402
from workbench.train import sweep as sw  # noqa: E402
from workbench.train.metrics import NullRunLog, RunLog, validation_listener  # noqa: E402
from workbench.train.sweep_results import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEBUG = str(ROOT / "configs" / "llama3" / "debug.toml")
TASK = str(ROOT / "configs" / "fundamentals" / "rnn_sequence.toml")


def sweep_dict(**changes) -> dict:
    d = {"sweep": {"name": "s", "base": DEBUG}, "space": {"optim.lr": {"loguniform": [1e-3, 1e-2]}},
         "overrides": {"train.steps": 10}}
    for key, value in changes.items():
        table, _, field = key.partition("__")
        if value is None:
            d[table].pop(field, None)
        elif field:
            d[table][field] = value
        else:
            d[table] = value
    return d


def test_a_sweep_file_loads_with_nested_or_dotted_paths():
    s = sw.load_sweep({"sweep": {"base": DEBUG, "num_samples": 3},
                       "space": {"optim": {"lr": {"choice": [1e-3, 3e-3]}}, "model.dim": {"grid": [32, 64]}},
                       "overrides": {"train": {"steps": 10}}})
    assert [(d.key, d.kind) for d in s.space] == [("optim.lr", "choice"), ("model.dim", "grid")]
    assert s.overrides == {"train.steps": 10} and s.kind == "train"
    assert s.n_trials() == 2 * 3  # each grid point num_samples times
    job = sw.trial_job(s, {"optim.lr": 3e-3, "model.dim": 64}, Path("/tmp/x/trial-001"))
    assert (job.optim.lr, job.model.config.dim, job.train.steps) == (3e-3, 64, 10)
    assert (job.run.out_dir, job.run.name) == ("/tmp/x", "trial-001")
    assert sw.load_sweep(sweep_dict(sweep__base=TASK, space={"train.lr": {"uniform": [1e-3, 1e-2]}},
                                    overrides={"train.epochs": 1})).kind == "task"


@pytest.mark.parametrize("changes, expected", [
    ({"sweep__base": None}, "'sweep.base'"),
    ({"sweep__base": "no/such.toml"}, "'sweep.base': no/such.toml not found"),
    ({"sweep__mode": "lowest"}, "'sweep.mode'"),
    ({"sweep__scheduler": "pbt"}, "'sweep.scheduler'"),
    ({"sweep__num_samples": 0}, "'sweep.num_samples'"),
    ({"extra": {}}, "'extra': unknown table"),
    ({"space": {}}, "nothing to sweep"),
    ({"space": {"optim.lr": 0.1}}, "'space.optim.lr': expected a table"),
    ({"space": {"optim.lr": {"choice": [1e-3], "grid": [1e-3]}}}, "exactly one of"),
    ({"space": {"optim.lr": {"choice": []}}}, "non-empty list"),
    ({"space": {"optim.lr": {"uniform": [0.1, 0.01]}}}, "low < high"),
    ({"space": {"optim.lr": {"loguniform": [0, 0.01]}}}, "0 < low"),
    ({"space": {"optim.lr": {"choice": [1e-3, 1e-3]}}}, "lists a value twice"),
    ({"space": {"optim.lr": {"normal": [1e-3, 1e-2]}}}, "'space.optim.lr': unknown kind 'normal'"),
    ({"space": {"optim.lr": "{ choice = [1e-3, 3e-3"}}, "not a TOML inline table"),
    ({"space": {"model.n_heads": {"choice": [3, 4]}}}, "'space.model.n_heads': the value 3 does not fit"),
    ({"sweep__max_t": 20, "sweep__scheduler": "median"}, "'sweep.max_t': is ASHA's last rung"),
    ({"space": {"model.n_heads": {"choice": [4]}, "model.dim": {"choice": [64, 66]}}},
     "'space.model.dim': the value 66 does not fit"),
    ({"space": {"run.name": {"choice": ["a", "b"]}}}, "names the trials' run folders"),
    ({"space": {"optim.lrr": {"choice": [1e-3]}}}, "'space.optim.lrr'"),
    ({"space": {"optim.lr": {"choice": [1e-3, -1.0]}}}, "'space.optim.lr': the value -1.0 does not fit"),
    ({"space": {"model.dim": {"grid": [32, "wide"]}}}, "'space.model.dim': the value 'wide'"),
    ({"overrides": {"optim.lr": 1e-3}}, "'overrides.optim.lr': also swept"),
    ({"overrides": {"train.stepz": 3}}, "train.stepz"),
    ({"sweep__workers": 2}, "'sweep.workers': 2 processes per trial"),
    ({"sweep__workers": 2, "sweep__gpus_per_worker": 0.5}, "'sweep.gpus_per_worker': 0.5 would put several nccl"),
    ({"sweep__eval_tasks": ["no_such_task"]}, "'sweep.eval_tasks'"),
    ({"sweep__eval_tasks": ["nerf"]}, "'sweep.eval_tasks': ['nerf'] evaluate nerf models"),
    ({"sweep__base": TASK, "space": {"train.lr": {"choice": [1e-3]}}, "overrides": {},
      "sweep__eval_tasks": ["perplexity"]}, "no eval task takes them"),
])
def test_bad_sweep_files_name_the_key(changes, expected):
    with pytest.raises(ConfigError, match=None) as e:
        sw.load_sweep(sweep_dict(**changes))
    assert expected in str(e.value), str(e.value)


def test_a_space_path_from_the_command_line_is_an_inline_table():
    s = sw.load_sweep(sweep_dict(), ["--space.optim.lr", "{ choice = [1e-3, 3e-3] }", "--sweep.num_samples", "2"])
    assert [(d.key, d.kind, d.values) for d in s.space] == [("optim.lr", "choice", (1e-3, 3e-3))]


def test_data_fields_that_change_the_dataset_need_their_own_folder(tmp_path):
    s = sw.load_sweep(sweep_dict(space={"data.vocab_size": {"choice": [300, 400]}}))
    with pytest.raises(ConfigError, match="'space.data.vocab_size': .* would share data.dir"):
        sw._prepare_data(s, log=lambda *_: None)
    s = sw.load_sweep(sweep_dict(space={"data.val_fraction": {"uniform": [0.05, 0.1]}}))
    with pytest.raises(ConfigError, match="'space.data.val_fraction': a data field drawn from a range"):
        sw._prepare_data(s, log=lambda *_: None)


def test_the_base_is_found_from_the_sweep_files_folders(tmp_path, monkeypatch):
    sweeps = tmp_path / "repo" / "configs" / "sweeps"
    sweeps.mkdir(parents=True)
    (tmp_path / "repo" / "configs" / "base.toml").write_text(Path(DEBUG).read_text())
    (sweeps / "s.toml").write_text('[sweep]\nbase = "configs/base.toml"\n[space]\n"optim.lr" = { choice = [1e-3] }\n')
    monkeypatch.chdir(tmp_path)  # neither the working folder nor the sweep file's own folder holds configs/
    assert sw.load_sweep(sweeps / "s.toml").base == tmp_path / "repo" / "configs" / "base.toml"


def test_asha_max_t_below_the_runs_end_is_refused():
    s = sw.load_sweep(sweep_dict(sweep__max_t=5))  # train.steps = 10
    with pytest.raises(ConfigError, match="'sweep.max_t': 5 is below train.steps"):
        sw._max_steps(s)
    assert sw._max_steps(sw.load_sweep(sweep_dict())) == 10
    assert sw._max_steps(sw.load_sweep(sweep_dict(sweep__base=TASK, space={"train.lr": {"choice": [1e-3]}},
                                                  overrides={}, sweep__max_t=50))) == 50


def test_multi_process_trials_need_a_train_config_and_a_layout_that_fits():
    with pytest.raises(ConfigError, match="task config"):
        sw.load_sweep(sweep_dict(sweep__base=TASK, sweep__workers=2, space={"train.lr": {"choice": [1e-3]}},
                                 overrides={}))
    s = sw.load_sweep(sweep_dict(sweep__workers=2, overrides={"parallel.backend": "fsdp2", "parallel.dp_shard": 2}))
    assert sw.trial_job(s, sw.first_values(s)).parallel.dp_shard == 2


def test_trial_names_follow_tunes_counter():
    assert sw.trial_name("3f2a1_00000") == "trial-000" and sw.trial_name("3f2a1_00012") == "trial-012"


def test_the_reporter_leaves_the_last_validation_to_the_final_report():
    got = []
    plan = {"metric": "val_loss", "kind": "train", "base": DEBUG}
    marks = sw.final_marks(plan, {"train.steps": 30})
    assert marks == {"step": 30, "epoch": None}
    on_val = sw._reporter(got.append, plan, marks)
    on_val({"step": 10, "val_loss": 2.5, "val_bpb": 1.2, "note": "x"})
    on_val({"step": 30, "val_loss": 2.0})  # the run's end: a scheduler must not stop it here
    assert got == [{"val_loss": 2.5, "val_bpb": 1.2, "step": 10}]
    # a task config ends at its last epoch (or at max_steps)
    task = {"metric": "val_mse", "kind": "task", "base": TASK}
    marks = sw.final_marks(task, {"train.epochs": 3})
    assert marks == {"step": None, "epoch": 3}
    on_val = sw._reporter(got.append, task, marks)
    on_val({"step": 20, "epoch": 2, "val_mse": 0.1})
    on_val({"step": 30, "epoch": 3, "val_mse": 0.05})
    assert got[1:] == [{"val_mse": 0.1, "epoch": 2.0, "step": 20}]
    assert sw.final_marks(task, {"train.max_steps": 25}) == {"step": 25, "epoch": 20}  # the file: 20 epochs
    with pytest.raises(WorkbenchError, match="'sweep.metric': 'val_acc' is not among .*val_loss"):
        sw._reporter(got.append, {**plan, "metric": "val_acc"}, marks)({"step": 10, "val_loss": 2.5})


def test_validation_listener_hears_every_rank_but_only_validation(tmp_path):
    heard = []
    with validation_listener(heard.append):
        log = RunLog(tmp_path)
        log.write({"step": 1, "loss": 3.0})  # a train record: not heard
        log.write({"step": 2, "val_loss": 2.0})
        NullRunLog().write({"step": 2, "val_loss": 2.0})  # what other ranks write to
        log.close()
    RunLog(tmp_path / "after").write({"step": 3, "val_loss": 1.0})  # outside the block: not heard
    assert heard == [{"step": 2, "val_loss": 2.0}] * 2


# ----------------------------------------------------------------------------------------------------
# Results from trial folders


def _fake_sweep(tmp_path: Path, trials: list[dict]) -> Path:
    """A sweep folder as trials leave it: sweep.toml, base.toml, trial folders with configs and metrics."""
    sdir = tmp_path / "sw"
    s = sw.load_sweep(sweep_dict(space={"optim.lr": {"loguniform": [1e-3, 1e-2]}, "model.dim": {"grid": [32, 64]}},
                                 sweep__name="sw", sweep__out_dir=str(tmp_path)))
    (sdir / "trials").mkdir(parents=True)
    (sdir / "sweep.toml").write_text(dumps_toml(s.resolved()))
    (sdir / "base.toml").write_text(Path(DEBUG).read_text())
    with open(sdir / "attempts.jsonl", "w") as f:
        for t in trials:
            d = sdir / "trials" / t["name"]
            d.mkdir()
            (d / "sweep_trial.json").write_text(json.dumps({"trial": t["name"], "trial_id": "x", "params": t["params"]}))
            (d / "config.toml").write_text(dumps_toml(sw.trial_job(s, t["params"], d)))
            (d / "metrics.jsonl").write_text("".join(json.dumps({"step": st, "val_loss": v}) + "\n"
                                                     for st, v in t["curve"]))
            if t.get("finished"):
                (d / "sweep_result.json").write_text(json.dumps({"metrics": {"val_loss": t["curve"][-1][1],
                                                                             "perplexity/bits_per_byte": 3.5},
                                                                 **({"eval_error": t["eval_error"]} if "eval_error" in t
                                                                    else {})}))
            for a in range(t.get("attempts", 1)):
                f.write(json.dumps({"trial": t["name"], "attempt": a + 1, "trains": True}) + "\n")
            f.write(json.dumps({"trial": t["name"], "attempt": 9, "trains": False}) + "\n")  # a re-report only
    return sdir


TRIALS = [
    {"name": "trial-000", "params": {"optim.lr": 0.002, "model.dim": 32}, "curve": [(0, 6.0), (10, 5.0), (20, 4.5)],
     "finished": True, "eval_error": "WorkbenchError: no held-out text"},
    {"name": "trial-001", "params": {"optim.lr": 0.008, "model.dim": 64}, "curve": [(0, 6.0), (10, 4.8), (20, 4.2)],
     "finished": True, "attempts": 2},
    {"name": "trial-002", "params": {"optim.lr": 0.001, "model.dim": 32}, "curve": [(0, 6.0), (10, 5.6)]},
    {"name": "trial-003", "params": {"optim.lr": 0.005, "model.dim": 64}, "curve": []},
]


def test_results_table_plots_and_best_config(tmp_path):
    sdir = _fake_sweep(tmp_path, TRIALS)
    summary = write_results(sdir, errors={"trial-003": "Traceback ...\nRuntimeError: boom"}, log=lambda *_: None)
    rows = summary["trials"]
    assert [r["trial"] for r in rows] == ["trial-001", "trial-000", "trial-002", "trial-003"]  # finished, best first
    assert [r["status"] for r in rows] == ["finished", "finished", "stopped at step 10", "failed"]
    assert rows[0]["attempts"] == 2 and rows[1]["attempts"] == 1  # the re-report is not an attempt
    assert summary["counts"] == {"finished": 2, "stopped": 1, "failed": 1, "unfinished": 0}
    table = list(csv.reader((sdir / "results.csv").open()))
    assert table[0] == ["trial", "optim.lr", "model.dim", "status", "steps", "val_loss", "best val_loss",
                        "perplexity/bits_per_byte", "attempts"]
    assert table[1][:7] == ["trial-001", "0.008", "64", "finished", "20", "4.2", "4.2"]
    report = (sdir / "report.md").read_text()
    assert "**Best:** trial-001" in report and "RuntimeError: boom" in report and "| trial-002 |" in report
    assert "trial-000 (finished): WorkbenchError: no held-out text" in report  # a failed eval, the training kept
    for png in ("sweep.png", "curves.png"):
        assert (sdir / png).stat().st_size > 10_000
    best = load_config(JobConfig, sdir / "best.toml")  # ready for `workbench train`
    assert (best.optim.lr, best.model.config.dim, best.run.name, best.run.out_dir) == (0.008, 64, "sw-best", "runs")
    assert (sdir / "best.toml").read_text().startswith("# The best trial of sweep sw: trial-001")
    # an interrupted sweep: trials that did not finish are unfinished, not stopped, and no best from them
    summary = write_results(sdir, interrupted=True, log=lambda *_: None)
    assert [r["status"] for r in summary["trials"]][2:] == ["unfinished", "unfinished"]


def test_no_finished_trial_means_no_best_config(tmp_path):
    sdir = _fake_sweep(tmp_path, [TRIALS[2]])
    summary = write_results(sdir, log=lambda *_: None)
    assert summary["best"] is None and not (sdir / "best.toml").exists()
    assert "No trial finished yet" in (sdir / "report.md").read_text()


def test_resume_refuses_another_sweep_in_the_same_folder(tmp_path):
    base = tmp_path / "base.toml"
    base.write_text(Path(DEBUG).read_text())
    s = sw.load_sweep(sweep_dict(sweep__base=str(base), sweep__out_dir=str(tmp_path)))
    s.dir.mkdir(parents=True)
    (s.dir / "sweep.toml").write_text(dumps_toml(s.resolved()))
    (s.dir / "base.toml").write_text(base.read_text())
    sw._check_resumable(s, s.dir)  # the same sweep: fine
    sw._check_resumable(sw.load_sweep(sweep_dict(sweep__base=str(base), sweep__out_dir=str(tmp_path),
                                                 sweep__num_cpus=8)), s.dir)  # resources may change
    other = sw.load_sweep(sweep_dict(sweep__base=str(base), sweep__out_dir=str(tmp_path),
                                     space={"optim.lr": {"loguniform": [1e-4, 1e-2]}}))
    with pytest.raises(WorkbenchError, match="space.optim.lr.loguniform"):
        sw._check_resumable(other, s.dir)
    base.write_text(base.read_text() + "\n# edited\n")
    with pytest.raises(WorkbenchError, match="changed since the sweep began"):
        sw._check_resumable(s, s.dir)
    assert load_toml(s.dir / "sweep.toml")["sweep"]["name"] == "s"


def test_the_exposure_check_sees_a_socket_open_to_other_machines():
    wide, local = socket.socket(), socket.socket()
    try:
        wide.bind(("0.0.0.0", 0))
        wide.listen()
        local.bind(("127.0.0.1", 0))
        local.listen()
        exposed = sw.exposed_listeners()
        assert any(addr == "0.0.0.0" for _, addr in exposed), exposed
        assert all(addr != "127.0.0.1" for _, addr in exposed)
        ports = {line.split()[1].split(":")[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]}
        assert f"{local.getsockname()[1]:04X}" in ports  # the loopback one is listed by the kernel, and not flagged
    finally:
        wide.close()
        local.close()


def _signal_self(signum) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.5)  # the handler runs in the main thread at its next bytecode


def test_a_stop_signal_writes_results_then_hands_the_stop_to_tune():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    calls, tune_stops = [], []
    guard = sw._Interrupts(lambda: calls.append("results"))
    with guard:
        signal.signal(signal.SIGUSR1, lambda *_: tune_stops.append(1))  # what Tune's loop installs
        _signal_self(signal.SIGTERM)
        assert calls == ["results"] and tune_stops == [1] and guard.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # a second signal stops at once
            _signal_self(signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored


def test_a_stop_signal_before_tunes_loop_stops_at_once_even_if_writing_fails():
    def broken():
        raise OSError("disk full")

    guard = sw._Interrupts(broken)
    with pytest.raises(KeyboardInterrupt):
        with guard:  # SIGUSR1 is reset to its default here: Tune's loop has not started
            _signal_self(signal.SIGINT)
    assert guard.signum == signal.SIGINT
