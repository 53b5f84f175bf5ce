"""Captioner latency benchmark: caption and steering latency on CPU with a GPT-2-small-sized LM.

Not a test: prints figures and writes ``benchmarks/reports/captioner-<device>.{json,md}``.
Weights are random (``GPT2Config()``, paper-default adapter, an SAE d=512 m=8192 with a threshold):
latency does not depend on them, and nothing is downloaded. Every caption is forced to exactly
``--tokens`` tokens (end token suppressed) so runs are comparable.

Measured from patch features (1, 14, 14, 512):
- ``caption``: INSIGHT captioner (SAE encode + decode, adapter, greedy decoding);
- ``steer``: one concept edit with the unsteered caption cached (the app's case: several edits of
  one image); the overhead goal is < 10 % over ``caption``;
- ``steer_cold``: the same, also decoding the unsteered caption (about two captions);
- ``caption_beam3``: beam search with 3 beams.
Goal: ``caption`` <= 1.5 s for 20 tokens on 2 CPU cores.

    python benchmarks/captioner.py [--threads 2] [--tokens 20] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from insight_core.concepts.steering import ConceptEdit, Steerer
from insight_core.models.captioner import CaptionerConfig, PrefixAdapter, SteerableCaptioner
from insight_core.models.sae import MatryoshkaSAE, SAEConfig

REPORTS = Path(__file__).resolve().parent / "reports"


def word_tokenizer(vocab_size: int):
    """A tokenizer covering GPT-2's vocabulary size without downloading GPT-2's (decode only)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {eos: vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=eos))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)


def build_model(seed: int = 0) -> SteerableCaptioner:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    lm = GPT2LMHeadModel(GPT2Config()).eval()  # GPT-2 small: 12 layers, width 768, 124M parameters
    sae = MatryoshkaSAE(SAEConfig(), seed=seed)
    sae.threshold.fill_(0.05)
    cfg = CaptionerConfig(lm="gpt2-small-random-init")
    adapter = PrefixAdapter(cfg, lm.config.hidden_size)
    return SteerableCaptioner(cfg, lm, word_tokenizer(lm.config.vocab_size), sae, adapter)


def timed(fn, repeats: int) -> dict:
    fn()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4), "runs": repeats}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model()
    x = torch.randn(14, 14, 512, generator=torch.Generator().manual_seed(1))
    n = args.tokens
    gen = {"max_new_tokens": n, "min_new_tokens": n}
    steerer = Steerer(model)
    codes = model.sae.encode(x.reshape(-1, 512))
    concept = int(codes.sum(0).argmax())  # the most active concept: a real edit
    edit = [ConceptEdit.remove(concept)]
    res = steerer.steer(x, edit, **gen)
    assert len(model.tokenizer(res.caption)["input_ids"]) == n, "captions must have exactly --tokens tokens"

    def cold() -> None:
        steerer._cache.clear()
        steerer.steer(x, edit, **gen)

    with torch.no_grad():
        results = {
            "caption": timed(lambda: model.caption(x, **gen), args.repeats),
            "steer": timed(lambda: steerer.steer(x, edit, **gen), args.repeats),
            "steer_cold": timed(cold, args.repeats),
            "caption_beam3": timed(lambda: model.caption(x, num_beams=3, **gen), max(3, args.repeats // 2)),
        }
    overhead = results["steer"]["median_s"] / results["caption"]["median_s"] - 1
    report = {
        "device": "cpu",
        "threads": args.threads,
        "tokens": n,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "model": "GPT2Config() random init (124M) + adapter 8 layers x 768, 10 queries + SAE 512x8192",
        "results": results,
        "steering_overhead": round(overhead, 4),
        "goals": {
            "caption_le_1_5_s": results["caption"]["median_s"] <= 1.5,
            "steering_overhead_lt_10pct": overhead < 0.10,
        },
    }
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "captioner-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = "\n".join(
        f"| {k} | {v['median_s']:.3f} | {v['min_s']:.3f} | {v['runs']} |" for k, v in results.items()
    )
    md = (
        f"# Captioner latency (cpu, torch {torch.__version__}, {args.threads} threads)\n\n"
        f"{report['model']}; random weights; every caption forced to {n} tokens.\n\n"
        "| path | median s | min s | runs |\n|---|---|---|---|\n"
        f"{rows}\n\n"
        f"Steering overhead (steer, unsteered caption cached, vs caption): {overhead:+.1%} (goal < 10 %).  \n"
        f"Caption latency goal (<= 1.5 s for {n} tokens): "
        f"{'met' if report['goals']['caption_le_1_5_s'] else 'NOT met'}.\n"
    )
    (REPORTS / "captioner-cpu.md").write_text(md)
    print(md)
    return report


if __name__ == "__main__":
    main()
