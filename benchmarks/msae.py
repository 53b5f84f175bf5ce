"""MSAE vs Matryoshka BatchTopK: training-step and Pareto-evaluation throughput at the paper's size.

Not a test: prints figures and writes ``benchmarks/reports/msae-{cpu,gpu}.{json,md}``.

    python benchmarks/msae.py [--device auto] [--steps 20] [--batch 4096] [--dict-size 8192]

Both kinds on the same random rows (d = 512): the BatchTopK kind at the paper's k = 12 with its six
groups, MSAE with levels 16 32 64 128 (the ``train-sae --kind msae`` default). A step is the loss,
backward, parallel-gradient removal, Adam and decoder renormalisation, as in the trainer; the
evaluation is :func:`insight_core.evaluation.pareto.sparsity_fve` at the MSAE levels (rows/s).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from insight_core.device import resolve_device
from insight_core.evaluation.pareto import sparsity_fve
from insight_core.models.msae import MSAE, MSAEConfig
from insight_core.models.sae import MatryoshkaSAE, SAEConfig

REPORTS = Path(__file__).resolve().parent / "reports"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_rate(sae: MatryoshkaSAE, x_bd: torch.Tensor, steps: int) -> float:
    """Training rows per second over ``steps`` steps (after 2 warm-up steps)."""
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    sae.init_from_batch(x_bd)
    for i in range(steps + 2):
        if i == 2:
            _sync(x_bd.device)
            t0 = time.perf_counter()
        out = sae.matryoshka_loss(x_bd)
        out.loss.backward()
        sae.remove_parallel_decoder_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()
    _sync(x_bd.device)
    return steps * len(x_bd) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--dict-size", type=int, default=8192)
    ap.add_argument("--eval-rows", type=int, default=32768)
    args = ap.parse_args()
    device = resolve_device(args.device)
    gen = torch.Generator().manual_seed(0)
    x_bd = torch.randn(args.batch, 512, generator=gen).to(device)
    levels = (16, 32, 64, 128)
    kinds = {
        "matryoshka (BatchTopK k=12, 6 groups)": MatryoshkaSAE(SAEConfig(d_in=512, dict_size=args.dict_size)),
        "msae (TopK levels 16 32 64 128)": MSAE(
            MSAEConfig(d_in=512, dict_size=args.dict_size, k_levels=levels)
        ),
    }
    results = []
    for name, sae in kinds.items():
        sae = sae.to(device)
        rate = step_rate(sae, x_bd, args.steps)
        sae.finish_training()
        rows = torch.randn(args.eval_rows, 512, generator=gen)
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            sparsity_fve(sae.eval(), rows, levels)
        _sync(device)
        eval_rate = args.eval_rows / (time.perf_counter() - t0)
        results.append(
            {"kind": name, "train_rows_per_s": round(rate, 1), "pareto_rows_per_s": round(eval_rate, 1)}
        )
        print(f"{name}: train {rate:,.0f} rows/s, sae-pareto at {list(levels)} {eval_rate:,.0f} rows/s")
    tag = "gpu" if device.type == "cuda" else "cpu"
    hw = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    doc = {"device": hw, "batch": args.batch, "dict_size": args.dict_size, "d": 512, "steps": args.steps,
           "eval_rows": args.eval_rows, "results": results}  # fmt: skip
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / f"msae-{tag}.json").write_text(json.dumps(doc, indent=1) + "\n")
    md = [f"# MSAE vs BatchTopK throughput ({hw})", "",
          f"d=512, m={args.dict_size}, batch {args.batch}, {args.steps} timed steps; random rows.", "",
          "| kind | train rows/s | sae-pareto rows/s (4 levels) |", "|---|---|---|"]  # fmt: skip
    md += [f"| {r['kind']} | {r['train_rows_per_s']:,.0f} | {r['pareto_rows_per_s']:,.0f} |" for r in results]
    (REPORTS / f"msae-{tag}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {REPORTS / f'msae-{tag}.json'}")


if __name__ == "__main__":
    main()
