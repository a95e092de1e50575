"""Preference and supervised training against TRL in the same run, and accuracy under one wall-clock budget.

SmolLM2-135M-Instruct (raylign's resolved bf16 folder) on this CPU, one trainer worker, fp32 master weights on
both sides, constant LR without warm-up, AdamW (fused on both), grad clip 1.0, seed 0. Compute (``--dtype``,
both sides): bf16 where the CPU has AVX512-BF16 or AMX, else fp32: without them torch's bf16 matmuls take a
non-native path (a 16 x 100-token SmolLM2 forward: 29 s bf16 or autocast vs 3.7 s fp32 on an AVX2 EPYC).
raylign's DPO reference is a bf16 copy in either case (trainer_worker), TRL's is the policy's dtype.

- ``dpo``: the same N arith pairs (difficulty 3, written once as TRL conversational jsonl) through raylign
  (``algorithm.data_path``) and TRL's DPOTrainer: 8 pairs a step, lr 5e-6, beta 0.1, sigmoid loss, one epoch.
  Both compute the reference log-probs inside the loop (TRL's ``precompute_ref_log_probs`` defaults to False).
  TRL reads the rows in raylign's batch order (sequential sampler), so step k is the same 8 pairs on both sides.
  pairs/s = pairs / training-loop seconds: raylign the sum of per-step ``timing/step`` (encode, reference
  log-probs, train step), TRL ``train_runtime`` of ``trainer.train()``. Model load and startup excluded.
- ``sft``: N arith worked solutions (prompt-completion rows), 16 a step, lr 2e-5, loss on the completion only;
  TRL without packing (its default), raylign packs. tokens/s = loss tokens / training-loop seconds, each side
  counting its own loss tokens (raylign ``train/tokens``; TRL the completion-mask tokens it trained on).
- ``accuracy``: RestEM (when its preset exists), online DPO-positive and GRPO (their presets, arith difficulty
  2) for ``--budget-s`` of training each. raylign has no time-budget option, so each runs
  ``round(budget / STEP_S[name])`` steps (seconds per step measured on this machine) and reports the training
  seconds it took (sum of ``timing/step``). Held-out greedy accuracy before and after (the built-in evals,
  ``--eval-limit`` problems). fp32 on CPUs without AVX512-BF16/AMX (as benchmarks/chaos.py does).

Each side runs in a fresh process. Writes benchmarks/results/preference.json and preference_*.png;
TRL is installed for the benchmark only: ``pip install --no-deps trl==1.16.0`` (``make bench`` does it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _parts import step_clock  # noqa: E402
RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "smollm2-135m-instruct"
DPO = {"batch": 8, "lr": 5e-6, "beta": 0.1}
SFT = {"batch": 16, "lr": 2e-5}
MAX_LENGTH = 1024  # TRL's max_length; every sequence is checked to fit, so nothing is truncated
SEED = 0
ACCURACY = {  # name: (preset, overrides)
    "restem": ("restem_arith.yaml", ["env.difficulty=2"]),
    "online_dpo": ("online_dpo_arith.yaml", ["env.difficulty=2"]),
    "grpo": ("grpo_arith.yaml", ["env.difficulty=2"]),
}
# Seconds per training step measured here (2-core AVX2 EPYC, fp32): raylign has no time-budget option, so the
# budget becomes a fixed step count per algorithm and the seconds it really took are reported.
STEP_S = {"restem": 45.0, "online_dpo": 30.0, "grpo": 25.0}
COMMON = [f"seed={SEED}", "trainer.num_workers=1", "trainer.warmup_steps=0", "fault.max_trainer_restarts=0",
          "train.checkpoint_every=0"]  # one checkpoint at the end, as TRL saves none


def cpu_flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        return set()


def cpu_has_bf16() -> bool:
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


# ---- data ----------------------------------------------------------------------------------------------

def write_data(workdir: Path, n: int) -> dict[str, str]:
    """The DPO pairs and SFT examples, once, as TRL-format jsonl both sides read."""
    from raylign.config import load_config
    from raylign.envs.pairs import arith_examples, arith_pairs, pairs_to_rows, write_jsonl

    cfg = load_config(ROOT / "configs/dpo_arith.yaml", ["env.difficulty=3"])
    pairs = arith_pairs(cfg.env, cfg.dataset, "train", n, SEED)
    examples = arith_examples(cfg.env, cfg.dataset, "train", n)
    rows = [{"prompt": [dict(m) for m in e.prompt], "completion": [{"role": "assistant", "content": e.response}]}
            for e in examples]
    return {"dpo": write_jsonl(pairs_to_rows(pairs), workdir / "pairs.jsonl"),
            "sft": write_jsonl(rows, workdir / "sft.jsonl")}


def raylign_order(n: int, batch: int) -> list[int]:
    """Row indices in the order raylign's PromptStream serves one epoch (what TRL is then fed sequentially)."""
    from raylign.orchestrator.checkpoint import PromptStream

    stream = PromptStream(list(range(n)), batch, SEED)
    return [i for _ in range(n // batch) for i in stream.next()]


def history(uri: str, run_id: str, keys: list[str]) -> dict[str, list[float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return {k: [m.value for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)] for k in keys}


# ---- raylign -------------------------------------------------------------------------------------------

def use_bf16(dtype: str) -> bool:
    return dtype == "bf16" or (dtype == "auto" and cpu_has_bf16())


def raylign_offline(kind: str, data: str, n: int, bf16: bool, workdir: Path) -> dict:
    import raylign

    batch, lr = (DPO["batch"], DPO["lr"]) if kind == "dpo" else (SFT["batch"], SFT["lr"])
    uri = f"sqlite:///{workdir}/mlflow-{kind}.db"
    overrides = [*COMMON, f"algorithm.data_path={data}", f"algorithm.batch_size={batch}", f"trainer.lr={lr}",
                 f"train.steps={n // batch}", "train.eval_before=false", "train.eval_after=false",
                 f"model.name={MODEL}", f"model.dtype={'bfloat16' if bf16 else 'float32'}", f"trainer.bf16={bf16}",
                 f"tracking.uri={uri}", f"output_dir={workdir}/raylign-{kind}"]
    if kind == "dpo":
        overrides += [f"algorithm.beta={DPO['beta']}", "algorithm.loss_type=sigmoid"]
    preset = f"configs/{kind}_arith.yaml"
    summary = raylign.train(str(ROOT / preset), overrides)
    keys = ["timing/step", "train/tokens", "timing/train", "timing/ref_logprobs", f"loss/{kind}"]
    keys += ["dpo/reward_accuracy", "dpo/margin"] if kind == "dpo" else []
    curves = history(uri, summary["mlflow_run_id"], keys)
    rows = [json.loads(line) for line in Path(summary["rollouts"]).read_text().splitlines()]
    id_key = "pair_id" if kind == "dpo" else "example_id"
    order = [int(r[id_key].rsplit("-", 1)[1]) for r in rows]
    return {"curves": curves, "order": order, "timing": summary["timing"], "wall_s": summary["wall_s"],
            "command": f"raylign.train({preset!r}, {overrides!r})"}


def raylign_budget(name: str, budget_s: float, eval_limit: int, workdir: Path) -> dict:
    import raylign

    preset, extra = ACCURACY[name]
    steps = max(2, round(budget_s / STEP_S[name]))
    uri = f"sqlite:///{workdir}/mlflow-{name}.db"
    overrides = [*COMMON, *extra, f"train.steps={steps}", "train.eval_before=true", "train.eval_after=true",
                 f"train.eval_limit={eval_limit}", f"tracking.uri={uri}", f"output_dir={workdir}/raylign-{name}"]
    if not cpu_has_bf16():
        overrides += ["model.dtype=float32", "trainer.bf16=false"]
    summary = raylign.train(str(ROOT / "configs" / preset), overrides)
    curves = history(uri, summary["mlflow_run_id"], ["timing/step", "reward/mean"])
    train_s = sum(curves["timing/step"])
    return {"accuracy_curve": [[0.0, summary["eval_before"]["accuracy"]], [train_s, summary["eval_after"]["accuracy"]]],
            "steps": steps, "planned_step_s": STEP_S[name], "train_s": train_s, "step_s": curves["timing/step"],
            "timing": summary["timing"], "wall_s": summary["wall_s"], "reward_curve": curves["reward/mean"],
            "command": f"raylign.train('configs/{preset}', {overrides!r})"}


def restem_missing() -> str | None:
    if not (ROOT / "configs/restem_arith.yaml").is_file():
        return "configs/restem_arith.yaml does not exist yet"
    from raylign.algorithms.registry import ALGORITHMS

    return None if "restem" in ALGORITHMS else "algorithm 'restem' is not registered yet"


# ---- TRL -----------------------------------------------------------------------------------------------

def _trl_common(steps: int, batch: int, lr: float, bf16: bool, workdir: Path) -> dict:
    return dict(output_dir=str(workdir / "trl"), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
                bf16=bf16, use_cpu=True, max_steps=steps, logging_steps=1, save_strategy="no", eval_strategy="no",
                report_to="none", dataloader_num_workers=0, seed=SEED, train_sampling_strategy="sequential",
                max_length=MAX_LENGTH)


def _trl_run(kind: str, data: str, n: int, bf16: bool, workdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylign.config import ModelConfig
    from raylign.models import resolve_model

    batch, lr = (DPO["batch"], DPO["lr"]) if kind == "dpo" else (SFT["batch"], SFT["lr"])
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    order = raylign_order(n, batch)
    dataset = Dataset.from_list([rows[i] for i in order])
    path = resolve_model(ModelConfig(name=MODEL))
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # fp32 master weights, as raylign's
    common = _trl_common(n // batch, batch, lr, bf16, workdir)
    if kind == "dpo":
        from trl import DPOConfig as TrlConfig, DPOTrainer as Trainer

        extra = dict(beta=DPO["beta"], loss_type=["sigmoid"], precompute_ref_log_probs=False)
    else:
        from trl import SFTConfig as TrlConfig, SFTTrainer as Trainer

        extra = dict(packing=False)  # completion_only_loss: None = on for prompt-completion rows
    clock = step_clock()

    trainer = Trainer(model=model, args=TrlConfig(**common, **extra), train_dataset=dataset,
                      processing_class=AutoTokenizer.from_pretrained(path), callbacks=[clock])
    prepared = trainer.train_dataset
    if kind == "dpo":
        lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in prepared]
        loss_tokens = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in prepared)
    else:
        assert trainer.completion_only_loss, "TRL did not turn on completion_only_loss for prompt-completion rows"
        lengths = [len(r["input_ids"]) for r in prepared]
        loss_tokens = sum(sum(label != -100 for label in r["labels"]) for r in prepared)  # completion tokens
    assert len(prepared) == n and max(lengths) <= MAX_LENGTH, (len(prepared), max(lengths))
    out = trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    curves = {"loss": [h["loss"] for h in logs]}
    if kind == "dpo":
        curves["reward_accuracy"] = [h.get("rewards/accuracies") for h in logs]
    return {"train_runtime_s": out.metrics["train_runtime"], "step_s": clock.step_s, "curves": curves,
            "loss_tokens": loss_tokens, "longest_sequence": max(lengths), "order": order,
            "torch_threads": torch.get_num_threads(),
            "command": f"{Trainer.__name__}(model, args={TrlConfig.__name__}(**{ {**common, **extra}!r}), ...)"}


# ---- summaries and plots -------------------------------------------------------------------------------

def summarise_offline(kind: str, n: int, ours: dict, trl: dict) -> dict:
    loop_s = sum(ours["curves"]["timing/step"])
    tokens = sum(ours["curves"]["train/tokens"])
    loss_key = f"loss/{kind}"
    out = {
        "items": n, "steps": len(ours["curves"]["timing/step"]),
        "same_batches": ours["order"] == trl["order"],
        "raylign": {"train_loop_s": loop_s, "loss_tokens": tokens, "tokens_per_s": tokens / loop_s,
                    "items_per_s": n / loop_s, "loss": ours["curves"][loss_key], "step_s": ours["curves"]["timing/step"],
                    "phase_totals_s": ours["timing"], "wall_s": ours["wall_s"], "load_avg_1min": ours["load_avg_1min"],
                    "command": ours["command"]},
        "trl": {"train_loop_s": trl["train_runtime_s"], "loss_tokens": trl["loss_tokens"],
                "tokens_per_s": trl["loss_tokens"] / trl["train_runtime_s"], "items_per_s": n / trl["train_runtime_s"],
                "loss": trl["curves"]["loss"], "step_s": trl["step_s"], "longest_sequence": trl["longest_sequence"],
                "torch_threads": trl["torch_threads"], "load_avg_1min": trl["load_avg_1min"], "command": trl["command"]},
    }
    if kind == "dpo":
        out["raylign"]["reward_accuracy"] = ours["curves"]["dpo/reward_accuracy"]
        out["trl"]["reward_accuracy"] = trl["curves"]["reward_accuracy"]
        out["raylign"]["ref_logprobs_s"] = sum(ours["curves"]["timing/ref_logprobs"])
    for side in ("raylign", "trl"):
        out[side]["first_step_loss"] = out[side]["loss"][0]
    out["median_step_s"] = {side: statistics.median(out[side]["step_s"]) for side in ("raylign", "trl")}
    # per-step medians: a check against load from other processes, which inflates some steps of one side only
    out["ratio_vs_trl_at_median_step"] = out["median_step_s"]["trl"] / out["median_step_s"]["raylign"]
    if kind == "sft":  # tokens differ per side (TRL's completion has one more token, the "\n" after <|im_end|>)
        out["ratio_vs_trl_at_median_step"] *= out["raylign"]["loss_tokens"] / out["trl"]["loss_tokens"]
    return out


def plot_losses(part: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for side in ("raylign", "trl"):
        loss, step_s = part[side]["loss"], part[side]["step_s"]
        axes[0].plot(range(1, len(loss) + 1), loss, marker=".", label=side)
        seconds = [sum(step_s[:i + 1]) for i in range(len(loss))] if len(step_s) == len(loss) else None
        if seconds:
            axes[1].plot(seconds, loss, marker=".", label=side)
    axes[0].set_xlabel("optimizer step (the same batch on both sides)")
    axes[1].set_xlabel("training-loop seconds")
    for ax in axes:
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_accuracy(algorithms: dict, budget_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, res in algorithms.items():
        if "accuracy_curve" in res:
            xs, ys = zip(*res["accuracy_curve"])
            ax.plot(xs, [100 * y for y in ys], marker="o", label=f"{name} ({res['steps']} steps)")
    ax.axvline(budget_s, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("training seconds (sum of timing/step; evals excluded)")
    ax.set_ylabel("held-out greedy accuracy (%)")
    ax.set_title(f"arith d2, SmolLM2-135M, CPU: {budget_s:.0f} s budget each")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def environment() -> dict:
    import torch
    import transformers

    flags = cpu_flags()
    try:
        import trl
        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "")
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {
        "machine": {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform(),
                    "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
                    "amx_tile": "amx_tile" in flags, "avx512f": "avx512f" in flags, "avx2": "avx2" in flags,
                    "bf16_note": "bf16 compute is native" if cpu_has_bf16() else
                    "no AVX512-BF16/AMX: bf16 matmuls on both sides take torch's non-native CPU path"},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "trl": trl_version,
                     "raylign_commit": git("rev-parse", "HEAD"),
                     "raylign_uncommitted": git("status", "--porcelain", "--", "raylign", "configs").splitlines()},
    }


# ---- driver --------------------------------------------------------------------------------------------

def run_side(side: str, args: argparse.Namespace, workdir: Path, data: dict | None = None) -> dict:
    """Run one side in a fresh process (stderr passes through); its last ``RESULT {json}`` line is the result."""
    cmd = [sys.executable, __file__, "--side", side, "--pairs", str(args.pairs), "--budget-s", str(args.budget_s),
           "--eval-limit", str(args.eval_limit), "--dtype", args.dtype, "--workdir", str(workdir), "--data", json.dumps(data or {})]
    load_before = os.getloadavg()[0]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"side {side} failed (exit {out.returncode}); its stderr is above")
    # 1-minute load average before and after: above the core count, something else shared the CPUs
    return {**json.loads(lines[-1][len("RESULT "):]), "load_avg_1min": [load_before, os.getloadavg()[0]]}


def side_main(args: argparse.Namespace) -> dict:
    workdir, data = Path(args.workdir), json.loads(args.data)
    kind, _, who = args.side.partition("-")
    if kind in ("dpo", "sft"):
        bf16 = use_bf16(args.dtype)
        if who == "trl":
            return _trl_run(kind, data[kind], args.pairs, bf16, workdir)
        return raylign_offline(kind, data[kind], args.pairs, bf16, workdir)
    return raylign_budget(who, args.budget_s, args.eval_limit, workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--part", choices=["dpo", "sft", "accuracy", "all"], default="all")
    parser.add_argument("--pairs", type=int, default=256, help="DPO pairs and SFT examples (one epoch each)")
    parser.add_argument("--budget-s", type=float, default=600.0, help="training seconds per algorithm (accuracy)")
    parser.add_argument("--eval-limit", type=int, default=100, help="held-out problems per eval (accuracy)")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                        help="dpo/sft compute on both sides; auto: bf16 where the CPU has AVX512-BF16 or AMX, else fp32")
    parser.add_argument("--out", default=str(RESULTS / "preference.json"), help="results file (merged per part); the plots go next to it")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print("RESULT " + json.dumps(side_main(args)), flush=True)
        return
    if args.pairs % max(DPO["batch"], SFT["batch"]):
        parser.error(f"--pairs must be a multiple of {max(DPO['batch'], SFT['batch'])} (whole batches, one epoch)")
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.is_file() else {}
    command = "python benchmarks/preference.py " + " ".join(sys.argv[1:])
    parts = ["dpo", "sft", "accuracy"] if args.part == "all" else [args.part]
    workdir = Path(tempfile.mkdtemp(prefix="raylign-preference-"))
    try:
        data = write_data(workdir, args.pairs) if {"dpo", "sft"} & set(parts) else None
        for part in parts:
            result.update(environment())
            result.setdefault("commands", {})[part] = command
            if part in ("dpo", "sft"):
                trl = run_side(f"{part}-trl", args, workdir, data)  # first: the side most likely to break on a TRL change
                ours = run_side(f"{part}-raylign", args, workdir, data)
                result[part] = summarise_offline(part, args.pairs, ours, trl)
                result[part]["compute"] = "bf16" if use_bf16(args.dtype) else "fp32"
                key = "dpo_pairs_per_s_ratio_vs_trl" if part == "dpo" else "sft_tokens_per_s_ratio_vs_trl"
                rate = "items_per_s" if part == "dpo" else "tokens_per_s"
                result[key] = result[part]["raylign"][rate] / result[part]["trl"][rate]
                if part == "dpo":
                    result["dpo_first_step_loss"] = {s: result["dpo"][s]["first_step_loss"] for s in ("raylign", "trl")}
                title = (f"{part.upper()} on {args.pairs} arith {'pairs' if part == 'dpo' else 'examples'}, "
                         f"SmolLM2-135M, CPU: raylign vs TRL")
                plot_losses(result[part], title, out_path.parent / f"preference_{part}_loss.png")
            else:
                algorithms = {}
                for name in ACCURACY:
                    missing = restem_missing() if name == "restem" else None
                    algorithms[name] = {"skipped": missing} if missing else run_side(f"accuracy-{name}", args, workdir)
                result["algorithms"] = algorithms
                result["accuracy_budget_s"] = args.budget_s
                result["accuracy_eval_limit"] = args.eval_limit
                plot_accuracy(algorithms, args.budget_s, out_path.parent / "preference_accuracy.png")
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    brief = {k: v for k, v in result.items() if k.endswith("_vs_trl") or k.endswith("first_step_loss")}
    brief["accuracy_curves"] = {k: v.get("accuracy_curve", v) for k, v in result.get("algorithms", {}).items()}
    print(json.dumps(brief, indent=2))


if __name__ == "__main__":
    main()
