"""`raylign eval|train CONFIG [key=value ...]`, `raylign data validate CONFIG`, `raylign index build CONFIG
[key=value ...]`, `raylign plan CONFIG [key=value ...]` (estimated memory), `raylign export RUN_DIR
[--merge|--adapter]` (the trained policy), `raylign report RUN_DIR [RUN_DIR ...] [--prompt ID]` (an HTML page
of a run, or of several overlaid) and `raylign config` (every field with its doc)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from raylign.config import ConfigError, config_fields, load_config


def _eval(args: argparse.Namespace) -> int:
    from raylign.orchestrator.preflight import plan_eval

    cfg, problems = plan_eval(load_config(args.config, args.overrides))  # bad data fails before Ray is imported
    from raylign.orchestrator.evaluate import run_eval

    summary = run_eval(cfg, problems)
    keys = ["accuracy"] + [k for k in summary if k.startswith("pass_at_")] + ["format_rate", "n", "model", "dataset"]
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    print(f"samples:  {summary['output_dir']}/samples.jsonl")
    print(f"summary:  {summary['output_dir']}/summary.json")
    if summary["mlflow_run_id"]:
        print(f"mlflow:   run {summary['mlflow_run_id']} in {cfg.tracking.uri} "
              f"(mlflow ui --backend-store-uri {cfg.tracking.uri})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from raylign.train import train

    overrides = args.overrides + (["algorithm.skip_invalid=true"] if args.skip_invalid else [])
    summary = train(args.config, overrides, resume=args.resume)
    before = summary.get("eval_before", {}).get("accuracy")
    after = summary.get("eval_after", {}).get("accuracy")
    fmt = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    print(f"held-out greedy accuracy: before {fmt(before)} -> after {fmt(after)} ({summary['steps']} steps, "
          f"{summary['wall_s'] / 60:.1f} min)")
    if summary.get("weight_sync"):
        from raylign.orchestrator.sync_check import describe_sync_layout

        print(f"weight sync: {describe_sync_layout(summary['weight_sync'])}")
    print(f"final model: {summary['final_model_dir']}")
    print(f"rollouts:    {summary['rollouts']}")
    print(f"summary:     {Path(summary['rollouts']).parent / 'summary.json'}")
    report = Path(summary["rollouts"]).parent / "report/index.html"
    if report.is_file():
        print(f"report:      {os.path.relpath(report)}")
    if summary["mlflow_run_id"]:
        print(f"mlflow:      run {summary['mlflow_run_id']} (make mlflow-ui, or "
              f"mlflow ui --backend-store-uri sqlite:///mlflow.db)")
    return 0


def _config(args: argparse.Namespace) -> int:
    if args.config:
        print(load_config(args.config, args.overrides).model_dump_json(indent=2))
        return 0
    for name, doc in config_fields().items():
        print(f"{name:34s} {doc}")
    return 0


def _data_validate(args: argparse.Namespace) -> int:
    """Every training row the config would read, checked as `raylign train` checks it: one line per bad row
    (file:row: field: reason), then a count. Exit 1 when any row is bad."""
    from raylign.envs import make_env
    from raylign.models import load_tokenizer, resolve_model
    from raylign.orchestrator.preflight import data_issues, training_problems

    cfg = load_config(args.config, args.overrides).absolutized()
    items, _ = training_problems(make_env(cfg.env, cfg.dataset, cfg.rag, cfg=cfg), cfg)
    tokenizer = load_tokenizer(resolve_model(cfg.model), trust_remote_code=cfg.model.trust_remote_code)
    issues = data_issues(items, cfg, tokenizer)
    for issue in issues:
        print(issue)
    bad = len({i.source for i in issues})
    kind = type(items[0]).__name__.lower() + "s" if items else "rows"
    print(f"{bad} of {len(items)} {kind} invalid ({len(issues)} problems)" if bad else f"all {len(items)} {kind} valid")
    return 1 if bad else 0


def _index_build(args: argparse.Namespace) -> int:
    import logging

    from raylign.envs.rag.store import DocumentStore, corpus_documents, describe

    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(args.config, args.overrides)
    docs, label = corpus_documents(cfg)
    info = describe(DocumentStore.build(docs, cfg.rag, progress=True))
    print(f"{'reusing' if info['reused'] else 'built'} index at {info['path']}")
    print(f"corpus:    {label}")
    print(f"documents: {info['documents']}   chunks: {info['chunks']}   embedding model: {info['embedding_model']}")
    print(f"reused:    {info['reused']}" + ("" if info["reused"] else f"   build time: {info['build_s']:.1f} s"))
    return 0


def _plan(args: argparse.Namespace) -> int:
    """Estimated memory per trainer worker and generator replica; reads config.json only, starts nothing."""
    from raylign.memory_plan import plan_for

    print(plan_for(load_config(args.config, args.overrides)))
    return 0


def _export(args: argparse.Namespace) -> int:
    """A run's trained policy as a merged HF folder or a peft adapter folder (no Ray)."""
    from raylign.export import export_run

    kind = "adapter" if args.adapter else "merged"
    if args.out is None and "://" in args.run_dir:
        print(f"raylign export: {args.run_dir} is a storage URI; name a local folder to write with --out",
              file=sys.stderr)
        return 2
    out = export_run(args.run_dir, args.out or Path(args.run_dir) / f"export-{kind}", adapter=args.adapter)
    print(f"wrote the {kind} model to {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    """A run folder as HTML + PNGs, several overlaid, or one prompt's accuracy (files only, no Ray)."""
    from raylign.report import write_prompt_plot, write_report

    if args.prompt is not None:
        if len(args.run_dirs) != 1:
            print("raylign: --prompt takes one RUN_DIR", file=sys.stderr)
            return 2
        try:
            print(f"wrote {write_prompt_plot(args.run_dirs[0], args.prompt, args.out)}")
        except KeyError as e:
            print(f"raylign: {e.args[0]}", file=sys.stderr)
            return 2
        return 0
    missing = [d for d in args.run_dirs if not Path(d).is_dir()]
    if missing:
        print(f"raylign: no such run folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    print(f"wrote {write_report(args.run_dirs, args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    parser = argparse.ArgumentParser(prog="raylign", description="Ray-based RL post-training for LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_text in [("eval", _eval, "evaluate a model on an env"),
                                ("train", _train, "train a policy (GRPO, PPO, VinePPO, SFT, DPO, RestEM, ...)"),
                                ("config", _config, "show config fields, or a resolved config")]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", nargs="?" if name == "config" else None, help="YAML preset (configs/*.yaml)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. generator.temperature=0.7")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
            p.add_argument("--skip-invalid", action="store_true",
                           help="drop (and count) SFT examples or pairs that fail validation instead of refusing them")
        p.set_defaults(fn=fn)
    data = sub.add_parser("data", help="training data (SFT examples, preference pairs)").add_subparsers(
        dest="action", required=True)
    p = data.add_parser("validate", help="check every example or pair the config would train on")
    p.add_argument("config", help="YAML preset (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.data_path=pairs.jsonl")
    p.set_defaults(fn=_data_validate)
    index = sub.add_parser("index", help="document indexes of the rag env").add_subparsers(dest="action", required=True)
    p = index.add_parser("build", help="build (or reuse) the ChromaDB + BM25 index that rag.* describes")
    p.add_argument("config", help="YAML preset (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rag.chunk_chars=600")
    p.set_defaults(fn=_index_build)
    p = sub.add_parser("plan", help="estimated memory per trainer worker and generator replica (starts nothing)")
    p.add_argument("config", help="YAML preset (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.backend=deepspeed")
    p.set_defaults(fn=_plan)
    p = sub.add_parser("export", help="write a run's trained policy as an HF folder (LoRA merged) or a peft adapter")
    p.add_argument("run_dir", help="a raylign train output_dir, or its train.storage location (reads its latest checkpoint)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--merge", action="store_true", help="a plain HF folder, adapters folded in (the default)")
    kind.add_argument("--adapter", action="store_true", help="the peft adapter folder alone (LoRA runs)")
    p.add_argument("--out", help="output folder (default RUN_DIR/export-merged or RUN_DIR/export-adapter)")
    p.set_defaults(fn=_export)
    p = sub.add_parser("report", help="an HTML report of a run (RUN_DIR/report/index.html), or of several overlaid")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="raylign train output_dir(s)")
    p.add_argument("--prompt", metavar="ID", help="only this prompt's accuracy over steps, as a PNG")
    p.add_argument("--out", help="output folder (one run: RUN_DIR/report; several: RUN_A/report/compare) or PNG path")
    p.set_defaults(fn=_report)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"raylign: config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # DataError, ModelError, CheckpointError: bad input named by file/field/row
        if type(e).__name__ in {"DataError", "ModelError", "CheckpointError", "ExportError"}:
            print(f"raylign: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        raise
    except RuntimeError as e:  # RunFailed: a fault past its limit, named in one line
        if type(e).__name__ == "RunFailed":
            print(f"raylign: run stopped: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
