"""fra's console (issue 15 §1): quiet by default, everything else in the run's log file, a progress
display fed by the workers' records, the final summary as a table.

The unit tests need no Ray. The end-to-end test runs the demo pipeline's CLI in a child process (its
own local Ray with log forwarding, as ``make demo`` does; ``ray.address=local`` so that it never joins
the test session's Ray) with a tiny override. ``-v`` is covered by the unit tests (the same stream path).
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fra import console

ROOT = Path(__file__).resolve().parents[1]
# What Ray's own output looks like on a console: a forwarded worker line "(Actor pid=N) ...", a Ray
# logger line "2026-12-06 09:00:21,469\tWARNING file.py:85 -- ...", the cleaner's warning, a raw
# report repr, Ray Data's plan.
RAY_LINE = re.compile(r"^\((\w+ )?pid=\d+|^\(\w+ pid=\d+|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING|ERROR)\s+\S+\.py:\d+ --"
                      r"|PlacementGroupCleaner|Failed to query Ray Train Controller|TrainingReport\(|Execution plan of Dataset"
                      r"|RayDeprecationWarning")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def streams(monkeypatch):
    """Stand-ins for the terminal, installed when called (pytest sets its own capture after fixtures)."""
    def install():
        out, err = io.StringIO(), io.StringIO()
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        return out, err
    return install


def test_quiet_console_sends_foreign_output_and_info_to_the_log_file(tmp_path, streams):
    out, err = streams()
    with console.session() as con:
        path = con.log_to(str(tmp_path), "run")
        console.echo("[pretrain] running ...")
        print("(RayTrainWorker pid=12) Reporting training result 1: TrainingReport(checkpoint=None)")
        print("\x1b[36m(SplitCoordinator pid=7)\x1b[0m Execution plan of Dataset train_1", file=sys.stderr)
        logging.getLogger("fra.some.stage").info("an info line of fra")
        logging.getLogger("fra.some.stage").warning("a fra warning")
        logging.getLogger("ray.data").error("a Ray error")  # errors of any logger are shown
        logging.getLogger("mlflow.store").warning("an MLflow warning")
    shown = out.getvalue() + err.getvalue()
    assert "[pretrain] running ..." in out.getvalue() and "warning: a fra warning" in err.getvalue()
    assert "a Ray error" in err.getvalue()
    for hidden in ("TrainingReport", "Execution plan", "an info line of fra", "an MLflow warning"):
        assert hidden not in shown
    logged = Path(path).read_text()
    assert Path(path).parent == tmp_path / "logs" and Path(path).name.startswith("run-")
    for line in ("(RayTrainWorker pid=12) Reporting training result 1", "(SplitCoordinator pid=7) Execution plan",
                 "INFO fra.some.stage: an info line of fra", "WARNING mlflow.store: an MLflow warning",
                 "fra: [pretrain] running ..."):
        assert line in logged, line
    assert "\x1b[" not in logged  # colour codes stripped
    assert sys.stdout is out and sys.stderr is err  # restored


def test_libraries_imported_before_the_console_are_routed_through_it(tmp_path, streams):
    """Ray and MLflow give their loggers a stream handler of their own and stop propagation at
    import; imported before the console opened, their lines must still go to the log file (errors
    also to the terminal) and their handlers come back afterwards."""
    import mlflow  # noqa: F401 - configures the "mlflow" logger
    import ray  # noqa: F401 - configures the "ray" logger

    before = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate) for n in ("ray", "mlflow")}
    assert all(handlers and not propagate for handlers, propagate in before.values())
    out, err = streams()
    with console.session() as con:
        path = con.log_to(str(tmp_path), "run")
        logging.getLogger("ray.train").info("a Ray info line")
        logging.getLogger("ray.data").error("a Ray error")
        logging.getLogger("mlflow.tracking").warning("an MLflow warning")
    assert "a Ray error" in err.getvalue()
    assert "a Ray info line" not in out.getvalue() + err.getvalue()
    assert "an MLflow warning" not in out.getvalue() + err.getvalue()
    logged = Path(path).read_text()
    for line in ("INFO ray.train: a Ray info line", "ERROR ray.data: a Ray error",
                 "WARNING mlflow.tracking: an MLflow warning"):
        assert line in logged, line
    assert {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate) for n in before} == before


def test_verbose_console_shows_everything_and_still_logs_it(tmp_path, streams):
    out, err = streams()
    with console.session() as con:
        con.configure(verbose=True)
        path = con.log_to(str(tmp_path), "run")
        print("(RayTrainWorker pid=12) Reporting training result 1")
        logging.getLogger("fra.x").debug("a debug line")
    assert "Reporting training result 1" in out.getvalue() and "a debug line" in err.getvalue()
    assert "Reporting training result 1" in Path(path).read_text()


def test_without_a_log_file_the_console_behaves_as_before(streams):
    out, err = streams()
    with console.session():
        print("a command's result")
        logging.getLogger("fra.registry").info("an info line")
    assert out.getvalue() == "a command's result\n" and "an info line" in err.getvalue()


def test_console_output_and_log_are_redacted(tmp_path, streams, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary-console-secret-123")
    out, err = streams()
    with console.session() as con:
        path = con.log_to(str(tmp_path), "run")
        console.echo("uses canary-console-secret-123")
        print("worker says s3://KEYID:uri-secret@bucket/x")
    assert "canary-console-secret-123" not in out.getvalue()
    logged = Path(path).read_text()
    assert "canary-console-secret-123" not in logged and "uri-secret" not in logged and "s3://***@bucket/x" in logged


def test_an_exception_is_recorded_in_the_log_and_propagates(tmp_path, streams):
    streams()
    with pytest.raises(RuntimeError, match="boom"):
        with console.session() as con:
            path = con.log_to(str(tmp_path), "run")
            raise RuntimeError("boom")
    assert "RuntimeError: boom" in Path(path).read_text()


def test_eta_from_the_observed_rate_hand_computed():
    # first seen at step 10 at t=100 s, step 20 at t=120 s: 0.5 steps/s, 10 steps left -> 20 s, and 5 s
    # after the record arrived the countdown shows 15 s
    rec = {"task": "pretrain", "done": 20, "total": 30, "unit": "step"}
    assert console.eta_seconds((10, 100.0), rec, 120.0, 125.0) == pytest.approx(15.0)
    assert console.eta_seconds((20, 100.0), rec, 100.0, 101.0) is None  # one observation: no rate yet
    assert console.eta_seconds((10, 100.0), {**rec, "done": 30}, 120.0, 125.0) == 0.0
    assert console.format_duration(15.2) == "0:15" and console.format_duration(3725) == "1:02:05"
    assert console.format_duration(None) == "--:--"


def test_progress_line_fields():
    line = console.format_progress({"task": "pretrain", "done": 20, "total": 30, "unit": "step", "epoch": 2,
                                    "epochs": 2, "loss": 3.4928, "images_per_s": 13.44}, 12.0)
    assert line == "pretrain  step 20/30  epoch 2/2  loss 3.493  13.4 img/s  ETA 0:12"
    line = console.format_progress({"task": "evaluate", "done": 3, "total": 8, "unit": "epoch", "loss": 1.5,
                                    "top1": 48.125}, None)
    assert line == "evaluate  epoch 3/8  loss 1.5  top-1 48.1%  ETA --:--"


def _record(task, done, total, unit="step", t=None, **f):
    return json.dumps({"task": task, "done": done, "total": total, "unit": unit, "t": time.time() if t is None else t,
                       **f})


def test_progress_lines_mode_prints_per_epoch_and_forgets_the_previous_stage(tmp_path, streams):
    out, _ = streams()
    with console.session() as con:
        con.log_to(str(tmp_path), "run")
        display = console._ProgressDisplay(con, live=False)
        display._show([("j/pretrain", _record("pretrain", 2, 10, epoch=1, epochs=2, loss=4.0))], 100.0)
        display._show([("j/pretrain", _record("pretrain", 4, 10, epoch=1, epochs=2, loss=3.9))], 101.0)  # same epoch
        step6 = _record("pretrain", 6, 10, epoch=2, epochs=2, loss=3.5)
        display._show([("j/pretrain", step6)], 102.0)
        display._show([("j/pretrain", step6)], 103.0)  # no change
        old = _record("pretrain", 7, 10, epoch=2, epochs=2, loss=3.4)  # written before the stage ended, read after
        con.echo("[pretrain] done in 30 s")
        display.new_section()
        display._show([("j/pretrain", old)], 104.0)  # the previous stage's: not shown
        display._show([("j/pretrain", old), ("j/evaluate", _record("evaluate", 1, 2, "epoch", top1=40.0))], 105.0)
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("  ")]
    # epoch 1 at 100 s; epoch 2 at 102 s (steps 2 -> 6 in 2 s: 2 steps/s, 4 left -> 2 s); then only the new stage
    assert lines == ["  pretrain  step 2/10  epoch 1/2  loss 4  ETA --:--",
                     "  pretrain  step 6/10  epoch 2/2  loss 3.5  ETA 0:02",
                     "  evaluate  epoch 1/2  top-1 40.0%  ETA --:--"]


def test_progress_live_mode_redraws_one_line_in_place(tmp_path, monkeypatch):
    tty, err = _Tty(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", tty)
    monkeypatch.setattr(sys, "stderr", err)
    with console.session() as con:
        con.log_to(str(tmp_path), "run")
        display = console._ProgressDisplay(con, live=True)
        display._show([("j/pretrain", _record("pretrain", 2, 10))], 100.0)
        display._show([("j/pretrain", _record("pretrain", 4, 10))], 102.0)
        con.echo("[pretrain] done")
    text = tty.getvalue()
    assert text.count("\r\x1b[K  pretrain  step") == 2 and "\n  pretrain" not in text  # redrawn, never a new line
    assert "step 4/10  ETA 0:06" in text  # 2 steps in 2 s, 6 left
    assert text.endswith("\r\x1b[K[pretrain] done\n")  # the live line is cleared before fra's next line


def test_summary_table_aligns_columns():
    text = console.table([["shards", "done", "3 s", "1 shard set(s), 400 images"],
                          ["register", "skipped", "-", "registered: fra-demo version 1"]],
                         ["stage", "status", "time", "result"])
    assert text.splitlines() == ["stage     status   time  result",
                                 "--------  -------  ----  ------",
                                 "shards    done     3 s   1 shard set(s), 400 images",
                                 "register  skipped  -     registered: fra-demo version 1"]


# ---- end to end --------------------------------------------------------------------------------
# One run of the demo pipeline's CLI serves the console test and the secrets test (one demo run
# fewer in the suite): a child process as `make demo` runs it, its own local Ray with log forwarding
# (``ray.address=local`` so that it never joins the test session's Ray), a tiny override, and a
# canary secret in its environment and in URIs of its config (recorded, never opened: synthetic
# data ignores shard roots), as a user's unused or mistaken setting would be.
def _tiny_demo(path: Path, storage: Path, canary_uri: str) -> Path:
    pipe = yaml.safe_load((ROOT / "pipelines" / "demo.yaml").read_text())
    pipe["storage_path"] = str(storage)
    pipe["ray"] = {**(pipe.get("ray") or {}), "address": "local"}
    pipe["shards"][0]["root"] = canary_uri
    pipe["shards"][0]["options"].update(num_identities=20)
    pre, ev = pipe["pretrain"], pipe["evaluate"]
    pre["data"]["shards"] = canary_uri
    pre["data"]["synthetic"].update(num_identities=8)
    pre["optim"].update(epochs=1, warmup_epochs=0)
    pre["run"].update(checkpoint_every=2, max_steps=3, log_every=2)
    ev["optim"].update(epochs=1, warmup_epochs=0)
    ev["run"].update(last_k=1)
    path.write_text(yaml.safe_dump(pipe))
    return path


@pytest.fixture(scope="module")
def demo_cli(tmp_path_factory):
    """(completed process, storage folder, canaries) of the demo pipeline's CLI run."""
    tmp = tmp_path_factory.mktemp("demo_cli")
    env_secret = f"fra-canary-env-{secrets.token_hex(6)}"
    uri_secret, key_id = f"fra-canary-uri-{secrets.token_hex(6)}", f"AKIDCANARY{secrets.token_hex(4).upper()}"
    storage = tmp / "storage"
    pipeline = _tiny_demo(tmp / "demo.yaml", storage, f"s3://{key_id}:{uri_secret}@bucket/{env_secret}/x")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(PYTHONPATH=str(ROOT), AWS_SECRET_ACCESS_KEY=env_secret)
    run = subprocess.run([sys.executable, "-m", "fra.cli.main", "run", str(pipeline)], capture_output=True, text=True,
                         env=env, timeout=600, cwd=ROOT)
    return run, storage, [uri_secret.encode(), key_id.encode(), env_secret.encode()]


@pytest.mark.ray
@pytest.mark.slow
def test_demo_cli_console_is_quiet_shows_progress_and_summary_and_the_log_has_the_rest(demo_cli):
    run = demo_cli[0]
    console_text = run.stdout + run.stderr
    assert run.returncode == 0, console_text
    lines = console_text.splitlines()
    assert not [ln for ln in lines if RAY_LINE.search(ln)], console_text  # no Ray-internal line
    for stage in ("shards", "pretrain", "evaluate", "register", "promote"):
        assert f"[{stage}] running ..." in console_text and re.search(rf"\[{stage}\] done in \d+ s", console_text)
    # progress from the workers' records (lines mode: output is a pipe), pretraining by step, FER by epoch
    pretrain = r"^  pretrain  step \d+/\d+  epoch 1/1  loss [\d.]+  [\d.]+ img/s  ETA"
    evaluate = r"^  evaluate  epoch 1/1  loss [\d.]+  top-1 [\d.]+%  [\d.]+ img/s  ETA"
    assert re.search(pretrain, console_text, re.M) and re.search(evaluate, console_text, re.M), console_text
    table = lines.index(next(ln for ln in lines if ln.startswith("stage ") and ln.split() == ["stage", "status", "time",
                                                                                          "result"]))
    assert [ln.split()[0] for ln in lines[table + 2:table + 7]] == ["shards", "pretrain", "evaluate", "register",
                                                                    "promote"]
    assert "models:/fra-demo@champion" in console_text and len(lines) < 60
    log_file = Path(next(ln for ln in lines if ln.startswith("log: ")).split()[1])
    logged = log_file.read_text()
    # the detail is in the log: Ray's driver lines, the workers' forwarded lines, fra's info lines
    assert "Started a local Ray instance" in logged and "(RayTrainWorker pid=" in logged
    assert re.search(r"fra: step 2/\d+ epoch 1", logged) and "INFO fra.train.ray_trainer: pretraining demo-pretrain" in logged
    # root cause, not display: Ray Train's placement-group cleaner reached the State API every time
    assert "Failed to query Ray Train Controller actor state" not in logged


@pytest.mark.ray
@pytest.mark.slow
def test_demo_pipeline_writes_no_secret(demo_cli):
    """The canaries are in no file under the storage folder (MLflow's database and artifacts, the
    run's log file with Ray's and the workers' lines, checkpoints unzipped), no MLflow param, tag or
    metric name, and not on the console; the configs were recorded, redacted."""
    from fra.redaction import MASK
    from tests.test_secrets import _found_in, _mlflow_strings

    run, storage, canaries = demo_cli
    assert run.returncode == 0, run.stdout + run.stderr
    assert "promotion: promoted" in run.stdout
    files = [f for f in storage.rglob("*") if f.is_file()]
    assert any(f.name == "checkpoint.pt" for f in files) and any(f.name == "model_card.json" for f in files)
    assert any(f.name == "results.json" for f in files) and (storage / "mlartifacts").is_dir()
    assert any(f.suffix == ".log" and f.parent.name == "logs" for f in files)
    leaks = {str(f.relative_to(storage)): hits for f in files if (hits := _found_in(f.read_bytes(), canaries))}
    assert not leaks
    # The configs were recorded (redacted), so the test looked where the canary would have been.
    manifest = json.loads((storage / "shards" / "fer_faces" / "manifest.json").read_text())
    assert manifest["source_root"] == f"s3://***@bucket/{MASK}/x"
    recorded = next(storage.rglob("final/config.yaml"))
    assert yaml.safe_load(recorded.read_text())["data"]["shards"] == f"s3://***@bucket/{MASK}/x"

    shown = _mlflow_strings(f"sqlite:///{storage}/mlflow.db")
    assert "s3://***@bucket/***/x" in shown  # pretrain's data.shards param
    assert not [s for s in shown if any(c.decode() in s for c in canaries)]
    assert not [c for c in canaries if c.decode() in run.stdout + run.stderr]
