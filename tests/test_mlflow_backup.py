"""The MLflow database survives ``ray down``: back up a live server's database to S3, restore it on a
"fresh head" and start a new server from it (what cluster.yaml's head start command does).

S3 is a local moto server reached through the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...), as an AWS or MinIO user would; the URIs carry no keys or endpoints.
"""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("moto")
pafs = pytest.importorskip("pyarrow.fs")

from fra.cli.main import main  # noqa: E402
from fra.errors import FraError  # noqa: E402
from fra.mlflow_backup import backup, restore, watch  # noqa: E402
from fra.mlflow_server import local_server  # noqa: E402

BUCKET = "fra-backup-test"
BACKUP = f"s3://{BUCKET}/fra/mlflow-backup/mlflow.db"


@pytest.fixture(scope="module")
def s3_env(s3_server):
    """The session's S3 server (tests/conftest.py: reached through the AWS_* environment) with this
    module's bucket; yields its pyarrow filesystem."""
    import boto3

    client = boto3.client("s3")
    if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=BUCKET)
    # NOTE: pyarrow reads AWS_ENDPOINT_URL through FileSystem.from_uri, not S3FileSystem()
    return pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]


def _populate(uri: str) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment("fra-pretrain")
    run = client.create_run(exp, run_name="fra-r50")
    client.log_metric(run.info.run_id, "loss", 1.25, step=3)
    client.log_param(run.info.run_id, "model.num_proto", "8")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("fra-r50-vggface2")
    for _ in range(2):
        client.create_model_version("fra-r50-vggface2", f"runs:/{run.info.run_id}/backbone", run.info.run_id)
    client.set_registered_model_alias("fra-r50-vggface2", "champion", "2")
    return {"run_id": run.info.run_id}


def _backup_size(fs) -> int:
    info = fs.get_file_info(BACKUP.removeprefix("s3://"))
    return -1 if info.type == pafs.FileType.NotFound else info.size


@pytest.mark.slow
def test_backup_restore_through_real_servers(s3_env, tmp_path):
    fs = s3_env
    first = local_server(tmp_path / "head1")
    with first:
        ids = _populate(first.url)
        # restore on a fresh head with no backup yet: nothing to do, the server starts a new database
        assert main(["mlflow-db", "restore", "--db", str(tmp_path / "none" / "mlflow.db"), "--from", BACKUP]) == 0
        assert not (tmp_path / "none" / "mlflow.db").exists()
        # backed up while the server runs (sqlite online backup)
        assert main(["mlflow-db", "backup", "--db", str(tmp_path / "head1" / "mlflow.db"), "--to", BACKUP]) == 0
        size = _backup_size(fs)
        assert size > 0
        # the watcher uploads again after a change (a new alias), within its period
        stop = threading.Event()
        watcher = threading.Thread(target=watch, args=(tmp_path / "head1" / "mlflow.db", BACKUP, 0.5, stop))
        watcher.start()
        try:
            from mlflow import MlflowClient

            MlflowClient(first.url).set_registered_model_alias("fra-r50-vggface2", "previous", "1")
            MlflowClient(first.url).set_registered_model_tag("fra-r50-vggface2", "note", "x" * 20000)
            deadline = time.time() + 30
            while _backup_size(fs) == size and time.time() < deadline:
                time.sleep(0.5)
        finally:
            stop.set()
            watcher.join(30)
        assert _backup_size(fs) > size, "the watcher did not upload the changed database"
    assert not [i for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/fra", recursive=True))
                if i.path.endswith(".partial")]

    # `ray down`, `ray up`: a new head restores, then starts a new server on the restored database
    head2 = tmp_path / "head2"
    assert main(["mlflow-db", "restore", "--db", str(head2 / "mlflow.db"), "--from", BACKUP]) == 0
    second = local_server(head2)
    with second:
        from mlflow import MlflowClient

        client = MlflowClient(second.url)
        run = client.get_run(ids["run_id"])
        assert run.data.metrics["loss"] == 1.25 and run.data.params["model.num_proto"] == "8"
        model = client.get_registered_model("fra-r50-vggface2")
        assert model.aliases == {"champion": "2", "previous": "1"}
        assert len(client.search_model_versions("name='fra-r50-vggface2'")) == 2


def test_restore_keeps_an_existing_database_and_rejects_a_corrupt_backup(tmp_path):
    db = tmp_path / "mlflow.db"
    con = sqlite3.connect(db)
    con.execute("create table t (x)")
    con.execute("insert into t values (1)")
    con.commit()
    con.close()
    backup(db, str(tmp_path / "backup" / "mlflow.db"))
    other = tmp_path / "other.db"
    other.write_bytes(b"")
    assert restore(str(tmp_path / "backup" / "mlflow.db"), other) is False  # kept, not overwritten
    assert other.read_bytes() == b""
    fresh = tmp_path / "fresh" / "mlflow.db"
    assert restore(str(tmp_path / "backup" / "mlflow.db"), fresh) is True
    assert sqlite3.connect(fresh).execute("select x from t").fetchall() == [(1,)]
    (tmp_path / "bad.db").write_bytes(b"not a database" * 100)
    with pytest.raises(FraError, match="not a usable sqlite database"):
        restore(str(tmp_path / "bad.db"), tmp_path / "fresh2" / "mlflow.db")
    assert not (tmp_path / "fresh2" / "mlflow.db").exists()


def test_watch_uploads_once_more_when_stopped(tmp_path):
    """A `ray up` restart stops the watcher with SIGTERM: a change since its last round is not lost."""
    import signal

    db, dest = tmp_path / "mlflow.db", tmp_path / "backup" / "mlflow.db"
    con = sqlite3.connect(db)
    con.execute("create table t (x)")
    con.commit()
    backup(db, str(dest))
    proc = subprocess.Popen([sys.executable, "-m", "fra.cli.main", "mlflow-db", "watch", "--db", str(db),
                             "--to", str(dest), "--every", "3600"], stderr=subprocess.PIPE, text=True)
    try:
        started = proc.stderr.readline()
        assert "every 3600 s" in started, started
        con.execute("insert into t values (7)")
        con.commit()
        con.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sqlite3.connect(dest).execute("select x from t").fetchall() == [(7,)]


def test_watch_uploads_a_change_made_before_it_started_and_not_an_unchanged_restore(tmp_path):
    """cluster.yaml starts the server before the watcher: a write in between must still reach the backup
    (seen in CI: a watcher that took the database's state at its start as "backed up" never uploaded it),
    while a database restored and left unchanged is not uploaded again."""
    db, dest = tmp_path / "mlflow.db", tmp_path / "backup" / "mlflow.db"
    con = sqlite3.connect(db)
    con.execute("create table t (x)")
    con.commit()
    backup(db, str(dest))
    restored = tmp_path / "head2" / "mlflow.db"
    assert restore(str(dest), restored) is True
    before = dest.stat().st_mtime_ns, dest.read_bytes()
    stop = threading.Event()
    stop.set()  # one round, then return

    def one_round(path):  # in a thread: in the main thread watch() takes over SIGINT and SIGTERM
        thread = threading.Thread(target=watch, args=(path, str(dest), 3600, stop))
        thread.start()
        thread.join(60)
        assert not thread.is_alive()

    one_round(restored)
    assert (dest.stat().st_mtime_ns, dest.read_bytes()) == before  # unchanged: not uploaded again

    con.execute("insert into t values (7)")  # written before the watcher starts
    con.commit()
    con.close()
    one_round(db)
    assert sqlite3.connect(dest).execute("select x from t").fetchall() == [(7,)]
