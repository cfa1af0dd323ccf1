"""`fra registry`: list, show, register, promote and roll back backbones in the MLflow registry.

The tracking URI comes from ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<abs>/runs/mlflow.db``. ``promote`` exits with 0 when the candidate is (or already was)
the champion and with 3 when it was refused; the reason is printed either way.
"""
from __future__ import annotations

import argparse
import json

REFUSED_EXIT = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    uri_help = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///<abs>/runs/mlflow.db)"
    parser.add_argument("--tracking-uri", default=None, help=uri_help)
    # Accepted after the action too (`fra registry list --tracking-uri ...`); SUPPRESS keeps the
    # value given before the action when it is absent here.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tracking-uri", default=argparse.SUPPRESS, help=uri_help)
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("list", parents=[common], help="registered models with their champion")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("show", parents=[common], help="versions, metrics, aliases and promotion history")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("register", parents=[common], help="register an exported backbone as a new version")
    p.add_argument("export_dir", help="export directory (backbone.pt + model_card.json), run dir or checkpoint")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--metrics", default=None, help="FER results.json (headline metrics, protocol, dataset fingerprint)")
    p.add_argument("--protocol", default=None, help="evaluation protocol (overrides the one from --metrics)")
    p.add_argument("--dataset-fingerprint", default=None, help="FER dataset fingerprint (overrides --metrics)")
    p.add_argument("--run-id", default=None, help="log into this MLflow run (default: a new run in fra-registry)")

    p = sub.add_parser("promote", parents=[common], help="make VERSION the champion if it beats the current one")
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.add_argument("--metric", default="fer_top1_mean_last5", help="gate metric (default: %(default)s)")
    p.add_argument("--margin", type=float, default=0.0, help="required improvement (default: %(default)s)")
    p.add_argument("--mode", choices=("max", "min"), default="max", help="higher or lower is better")

    p = sub.add_parser("rollback", parents=[common], help="restore the champion the current one replaced")
    p.add_argument("name")


def run(args: argparse.Namespace) -> int:
    from fra import registry

    uri = args.tracking_uri
    if args.action == "list":
        rows = registry.list_models(uri)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        if not rows:
            print("no registered models")
        for r in rows:
            champion = f"v{r['champion']}" if r["champion"] is not None else "-"
            print(f"{r['name']:<32} latest v{r['latest_version']}  champion {champion}")
        return 0
    if args.action == "show":
        info = registry.show(args.name, uri)
        print(json.dumps(info, indent=2) if args.json else _format_show(info))
        return 0
    if args.action == "register":
        metrics, protocol, fingerprint = {}, "", ""
        if args.metrics:
            metrics, protocol, fingerprint = registry.fer_metrics_from_results(args.metrics)
        version = registry.register_backbone(
            args.export_dir, args.name, tracking_uri=uri, fer_metrics=metrics,
            eval_protocol=args.protocol if args.protocol is not None else protocol,
            dataset_fingerprint=args.dataset_fingerprint if args.dataset_fingerprint is not None else fingerprint,
            run_id=args.run_id)
        print(f"registered {version.uri} (run {version.run_id})")
        return 0
    if args.action == "promote":
        decision = registry.promote(args.name, args.version, gate_metric=args.metric, margin=args.margin,
                                    mode=args.mode, tracking_uri=uri)
        print(decision)
        return 0 if decision.decision in ("promoted", "unchanged") else REFUSED_EXIT
    if args.action == "rollback":
        print(registry.rollback(args.name, tracking_uri=uri))
        return 0
    raise AssertionError(args.action)


def _format_show(info: dict) -> str:
    champion = info["aliases"].get("champion")
    lines = [f"{info['name']}  champion: {'v' + str(champion) if champion is not None else '-'}  "
             f"aliases: {info['aliases']}"]
    for v in info["versions"]:
        metrics = ", ".join(f"{k}={val:.4g}" for k, val in sorted(v["metrics"].items()))
        mark = "*" if v["version"] == champion else " "
        lines.append(f" {mark}v{v['version']:<4} {v['status']:<8} {v['architecture']:<10} "
                     f"protocol={v['eval_protocol'] or '-'} data={v['dataset_fingerprint'] or '-'}  {metrics}")
    if info["history"]:
        lines.append("history:")
    for e in info["history"]:
        lines.append(f"  {e['time']} {e['who']}: v{e['candidate']} {e['decision']} "
                     f"(previous champion {e['previous_champion']}) - {e['reason']}")
    return "\n".join(lines)
