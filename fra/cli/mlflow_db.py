"""`fra mlflow-db`: back up / restore the MLflow server's sqlite database (cluster.yaml's head).

    fra mlflow-db restore --db ~/mlflow/mlflow.db --from s3://bucket/fra/mlflow-backup/mlflow.db
    fra mlflow-db backup  --db ~/mlflow/mlflow.db --to   s3://bucket/fra/mlflow-backup/mlflow.db
    fra mlflow-db watch   --db ~/mlflow/mlflow.db --to   s3://... --every 60

``restore`` keeps an existing database and exits 0 when there is no backup yet (a first cluster);
``watch`` runs until SIGTERM and backs up once more before it exits.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = actions.add_parser("restore", help="download the backup unless the database exists")
    p.add_argument("--db", required=True, help="local sqlite file of the MLflow server")
    p.add_argument("--from", dest="location", required=True, help="backup URI (s3://...) or path")
    for name, help_text in (("backup", "upload a consistent snapshot now"),
                            ("watch", "upload a snapshot after every change, until stopped")):
        p = actions.add_parser(name, help=help_text)
        p.add_argument("--db", required=True, help="local sqlite file of the MLflow server")
        p.add_argument("--to", dest="location", required=True, help="backup URI (s3://...) or path")
        if name == "watch":
            p.add_argument("--every", type=float, default=60.0, help="seconds between checks for a change")


def run(args: argparse.Namespace) -> int:
    from fra import mlflow_backup

    if args.action == "restore":
        mlflow_backup.restore(args.location, args.db)
    elif args.action == "backup":
        mlflow_backup.backup(args.db, args.location)
    else:
        mlflow_backup.watch(args.db, args.location, every_s=args.every)
    return 0
