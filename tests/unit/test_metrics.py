"""RunLog: the JSONL (append, flush, resume truncation), TensorBoard scalars (tags, purge on resume), loss.png."""

import json

import pytest

from workbench.train.metrics import RunLog, plot_loss, read_metrics, tb_tag

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def train_rec(step, loss):
    return {"step": step, "loss": loss, "lr": 1e-3 * step, "grad_norm": 0.5, "tokens_per_s": 5000.0,
            "gflops": 12.0}


def scalars(run_dir):
    """tag -> [(step, value)] as TensorBoard would show them (purged events dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_jsonl_appends_each_record_flushed(tmp_path):
    log = RunLog(tmp_path, baselines={})
    log.write(train_rec(10, 3.2))
    # readable before close: each write is flushed
    assert read_metrics(tmp_path / "metrics.jsonl") == [train_rec(10, 3.2)]
    log.write({"step": 10, "val_loss": 3.4, "val_bpb": 1.2, "note": "ok"})
    log.write(train_rec(20, 3.0))
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        train_rec(10, 3.2), {"step": 10, "val_loss": 3.4, "val_bpb": 1.2, "note": "ok"}, train_rec(20, 3.0)]
    log.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        log.write(train_rec(30, 2.9))


def test_new_run_starts_a_fresh_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(train_rec(5, 9.0)) + "\n")
    with RunLog(tmp_path) as log:
        log.write(train_rec(1, 4.0))
    assert read_metrics(tmp_path / "metrics.jsonl") == [train_rec(1, 4.0)]


def test_write_needs_an_int_step(tmp_path):
    with RunLog(tmp_path) as log:
        for bad in ({"loss": 1.0}, {"step": 1.5, "loss": 1.0}, {"step": True, "loss": 1.0}):
            with pytest.raises(ValueError, match="step"):
                log.write(bad)
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_resume_truncates_after_the_checkpoint_and_keeps_earlier_records(tmp_path):
    with RunLog(tmp_path) as log:
        for step in (10, 20, 30, 40):
            log.write(train_rec(step, 5.0 - step / 10))
            if step % 20 == 0:
                log.write({"step": step, "val_loss": 5.5 - step / 10})
    # crash, then resume from the checkpoint at step 20: steps 21.. run again
    log = RunLog(tmp_path, resume_step=20)
    kept = [train_rec(10, 4.0), train_rec(20, 3.0), {"step": 20, "val_loss": 3.5}]
    assert read_metrics(tmp_path / "metrics.jsonl") == kept
    assert log.records == kept  # in memory too, for the plot
    log.write(train_rec(30, 2.5))
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [10, 20, 20, 30]
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["loss"] == 2.5
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_resume_without_a_metrics_file_starts_empty(tmp_path):
    with RunLog(tmp_path, resume_step=50) as log:
        assert log.records == []
        log.write(train_rec(60, 1.0))
    assert read_metrics(tmp_path / "metrics.jsonl") == [train_rec(60, 1.0)]


def test_read_metrics_drops_a_torn_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []  # no file yet
    path.write_text(json.dumps(train_rec(1, 2.0)) + "\n" + '{"step": 2, "lo')
    assert read_metrics(path) == [train_rec(1, 2.0)]
    path.write_text('{"step": 2, "lo\n' + json.dumps(train_rec(1, 2.0)) + "\n")
    with pytest.raises(ValueError, match=":1:"):
        read_metrics(path)


def test_tb_tags():
    assert tb_tag("loss") == "train/loss" and tb_tag("grad_norm") == "train/grad_norm"
    assert tb_tag("val_loss") == "val/loss" and tb_tag("val_bpb") == "val/bpb"


def test_tensorboard_scalars_and_tags(tmp_path):
    with RunLog(tmp_path) as log:
        log.write(train_rec(10, 3.2))
        log.write({"step": 10, "val_loss": 3.4, "val_bpb": 1.2, "note": "text", "skipped": False})
        log.write(train_rec(20, 3.0))
    got = scalars(tmp_path)
    assert set(got) == {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/gflops",
                        "val/loss", "val/bpb"}  # no step, no string, no bool
    assert got["train/loss"] == [(10, pytest.approx(3.2)), (20, pytest.approx(3.0))]
    assert got["train/lr"] == [(10, pytest.approx(0.01)), (20, pytest.approx(0.02))]
    assert got["val/loss"] == [(10, pytest.approx(3.4))]
    assert got["val/bpb"] == [(10, pytest.approx(1.2))]
    # the skipped fields are still in the JSONL
    assert read_metrics(tmp_path / "metrics.jsonl")[1]["note"] == "text"


def test_tensorboard_purges_steps_after_the_resume_point(tmp_path):
    with RunLog(tmp_path) as log:
        for step in (10, 20, 30, 40):
            log.write(train_rec(step, float(step)))
        log.write({"step": 40, "val_loss": 99.0})
    assert [s for s, _ in scalars(tmp_path)["train/loss"]] == [10, 20, 30, 40]
    with RunLog(tmp_path, resume_step=20) as log:
        log.write(train_rec(30, 0.3))
    got = scalars(tmp_path)
    assert got["train/loss"] == [(10, 10.0), (20, 20.0), (30, pytest.approx(0.3))]  # old 30 and 40 gone
    assert got.get("val/loss", []) == []  # the val record at step 40 was after the checkpoint


def assert_png(path, min_bytes=5000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > min_bytes
    assert data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 400 and height >= 300
    return data


def test_plot_writes_a_png_covering_the_whole_resumed_run(tmp_path):
    with RunLog(tmp_path) as log:
        for step in range(10, 110, 10):
            log.write(train_rec(step, 8.0 / (1 + step / 20)))
            if step % 50 == 0:
                log.write({"step": step, "val_loss": 9.0 / (1 + step / 20), "val_bpb": 2.0 / (1 + step / 50)})
    with RunLog(tmp_path, resume_step=50, baselines={"unigram val loss": 6.1}) as log:
        for step in range(60, 110, 10):
            log.write(train_rec(step, 7.0 / (1 + step / 20)))
        out = log.plot()
        assert len(log.records) == 5 + 1 + 5  # steps 10..50, val@50, then 60..100 again
    assert out == tmp_path / "loss.png"
    assert_png(out)
    assert not (tmp_path / "loss.png.tmp").exists()


def test_plot_with_no_records_does_not_fail(tmp_path):
    with RunLog(tmp_path, baselines={"unigram val loss": 6.1}) as log:
        out = log.plot()
    assert_png(out, min_bytes=1000)
    plot_loss([], tmp_path / "sub" / "empty.png")  # a bare call, without baselines or title
    assert_png(tmp_path / "sub" / "empty.png", min_bytes=1000)


def test_plot_content_depends_on_the_data(tmp_path):
    """Not a blank canvas: adding curves and a second (bpb) panel changes the image."""
    recs = [train_rec(s, 5.0 - s / 50) for s in range(0, 200, 10)]
    plot_loss([], tmp_path / "empty.png", title="run")
    plot_loss(recs, tmp_path / "train.png", title="run")
    plot_loss(recs + [{"step": 100, "val_loss": 3.5, "val_bpb": 1.1}], tmp_path / "bpb.png", title="run")
    empty, train, bpb = (assert_png(tmp_path / n, 1000) for n in ("empty.png", "train.png", "bpb.png"))
    assert empty != train
    h_train, h_bpb = (int.from_bytes(d[20:24], "big") for d in (train, bpb))
    assert h_bpb > h_train  # the val bits-per-byte panel makes the figure taller
