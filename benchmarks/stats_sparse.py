"""Sparse vs dense co-occurrence in the stats pass: speed at m = 8,192, memory and files at m = 65,536.

Not a test: prints figures and writes ``benchmarks/reports/stats-sparse-{cpu,gpu}.{json,md}``.

    python benchmarks/stats_sparse.py                       # both parts
    python benchmarks/stats_sparse.py --big-patches 100000  # the m = 65,536 part at 100 k patches

- speed: the ``stats`` accumulator fed a random m = 8,192 SAE's codes (threshold keeping ~k = 12
  latents per patch; 64 images x 196 patches per batch, as ``benchmarks/pipeline.py``), once with this
  tree's sparse accumulator and once with the dense one of git ``--baseline-ref`` (default ``main``,
  loaded from ``git show``), each in its own process (peak RSS is a process high-water mark). Wall and
  CPU seconds (``time.process_time``): the machine is shared, CPU seconds are the steadier figure.
- paper scale: ``compute_stats`` (chunked encoding) -> save -> families at m = 65,536, k = 12 with a
  random-init SAE (training one at m = 65,536 on CPU takes hours; a random SAE thresholded to k = 12
  gives the same sparsity pattern): peak RSS of the process, bytes of the saved statistics files
  (D separately), seconds per step.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REPORTS = Path(__file__).resolve().parent / "reports"
IMAGES_PER_BATCH, PATCHES = 64, 196


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _random_sae(m: int, k: int, d: int = 512):
    from insight_core.models.sae import MatryoshkaSAE, SAEConfig

    torch.manual_seed(0)
    sae = MatryoshkaSAE(SAEConfig(d_in=d, dict_size=m, k=k))
    x = torch.randn(2048, d)
    with torch.no_grad():  # a threshold that keeps ~k latents per patch
        pre = sae.pre_activations(x)
        sae.threshold.fill_(float(pre.flatten().kthvalue(pre.numel() - k * len(x)).values))
    return sae


def _baseline_module(ref: str) -> types.ModuleType:
    """``insight_core/concepts/stats.py`` as of git ``ref`` (the dense accumulator), as a module."""
    src = subprocess.run(["git", "show", f"{ref}:insight_core/concepts/stats.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    mod = types.ModuleType("stats_baseline")
    sys.modules["stats_baseline"] = mod
    exec(compile(src, f"{ref}:insight_core/concepts/stats.py", "exec"), mod.__dict__)
    return mod


def worker_speed(variant: str, ref: str, m: int, k: int, n_patches: int) -> dict:
    """One stats pass (encode + update + finalize) in this process; the figures as a dict."""
    if variant == "dense":
        acc_cls = _baseline_module(ref).StatsAccumulator
    else:
        from insight_core.concepts.stats import StatsAccumulator as acc_cls
    sae = _random_sae(m, k)
    acc = acc_cls(m)
    gen = torch.Generator().manual_seed(1)
    batch, done, image = IMAGES_PER_BATCH * PATCHES, 0, 0
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    while done < n_patches:
        feats = torch.randn(batch, 512, generator=gen)
        with torch.no_grad():
            codes = sae.encode(feats)
        ids = torch.arange(image, image + IMAGES_PER_BATCH).repeat_interleave(PATCHES)
        acc.update(codes, ids, torch.arange(PATCHES).repeat(IMAGES_PER_BATCH))
        done, image = done + batch, image + IMAGES_PER_BATCH
    st = acc.finalize()
    wall, cpu = time.perf_counter() - t_wall, time.process_time() - t_cpu
    d_entries = int(st.cooc.nnz) if hasattr(st, "cooc") else int((st.D_mm != 0).sum())
    return {"variant": variant, "m": m, "k": k, "patches": done, "wall_s": wall, "cpu_s": cpu,
            "patches_per_s": done / wall, "patches_per_cpu_s": done / cpu, "peak_rss_mb": _peak_rss_mb(),
            "d_entries": d_entries}  # fmt: skip


def worker_big(m: int, k: int, n_patches: int) -> dict:
    """compute_stats -> save -> families at paper scale, in this process."""
    from insight_core.concepts.families import build_families
    from insight_core.concepts.stats import ConceptStats, compute_stats

    sae = _random_sae(m, k)
    gen = torch.Generator().manual_seed(1)
    n_images = -(-n_patches // PATCHES)
    per = IMAGES_PER_BATCH

    def batches():
        for s in range(0, n_images, per):
            n = min(per, n_images - s)
            yield torch.randn(n, PATCHES, 512, generator=gen), torch.arange(s, s + n)

    t = time.perf_counter(), time.process_time()
    st = compute_stats(sae, batches(), progress=False)
    stats_s = time.perf_counter() - t[0], time.process_time() - t[1]
    rss_stats = _peak_rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        tensors, meta = Path(tmp) / "concept_stats.safetensors", Path(tmp) / "concept_stats.json"
        st.save(tensors, meta)
        files = tensors.stat().st_size + meta.stat().st_size
        t = time.perf_counter(), time.process_time()
        back = ConceptStats.load(tensors, meta)
        fam = build_families(back.cooc, back.freq_patches_m)
        fam_s = time.perf_counter() - t[0], time.process_time() - t[1]
    return {"m": m, "k": k, "patches": n_images * PATCHES,
            "stats_wall_s": stats_s[0], "stats_cpu_s": stats_s[1],
            "stats_peak_rss_mb": rss_stats, "files_bytes": files, "d_bytes": st.cooc.nbytes,
            "d_entries": st.cooc.nnz, "k_max": st.k_max,
            "families_wall_s": fam_s[0], "families_cpu_s": fam_s[1], "n_edges": len(fam.parent_e),
            "peak_rss_mb": _peak_rss_mb()}  # fmt: skip


def _run_worker(args: list[str]) -> dict:
    cmd = [sys.executable, __file__, *args]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=int, default=200_000, help="patches per speed run (m = 8,192)")
    ap.add_argument("--big-patches", type=int, default=100_000, help="patches at m = 65,536 (0: skip)")
    ap.add_argument("--baseline-ref", default=None,
                    help="git ref of the dense stats.py (default: merge-base of HEAD and main)")  # fmt: skip
    ap.add_argument("--worker", choices=["dense", "sparse", "big"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_ref is None:
        args.baseline_ref = subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=ROOT, check=True,
                                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    if args.worker == "big":
        print(json.dumps(worker_big(65536, 12, args.big_patches)))
        return
    if args.worker:
        print(json.dumps(worker_speed(args.worker, args.baseline_ref, 8192, 12, args.patches)))
        return
    report: dict = {"device": "cpu", "torch_threads": torch.get_num_threads()}
    report["baseline_ref"] = args.baseline_ref
    common = ["--patches", str(args.patches), "--baseline-ref", args.baseline_ref]
    runs = [_run_worker(["--worker", v, *common]) for v in ("dense", "sparse", "dense", "sparse")]
    report["speed"] = runs
    for r in runs:
        print(f"{r['variant']:6s} m={r['m']}: {r['patches_per_s']:,.0f} patches/s wall, "
              f"{r['patches_per_cpu_s']:,.0f} per CPU s, peak RSS {r['peak_rss_mb']:.0f} MB")  # fmt: skip
    if args.big_patches:
        big = _run_worker(["--worker", "big", "--big-patches", str(args.big_patches)])
        report["paper_scale"] = big
        print(f"m=65536: stats {big['stats_wall_s']:.0f} s, peak RSS {big['stats_peak_rss_mb']:.0f} MB, "
              f"files {big['files_bytes'] / 1e6:.0f} MB (D {big['d_bytes'] / 1e6:.1f} MB), "
              f"families {big['families_wall_s']:.1f} s, {big['n_edges']} edges")  # fmt: skip
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "stats-sparse-cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    threads, ref = report["torch_threads"], args.baseline_ref[:10]
    md = [f"# Sparse co-occurrence in the stats pass (cpu, {threads} threads, shared machine)", "",
          f"Speed at m = 8,192, k ~ 12, {args.patches:,} patches per run, dense = `{ref}`'s "
          "accumulator; runs alternate dense/sparse, each in its own process.", "",
          "| run | patches/s (wall) | patches per CPU s | peak RSS MB | stored D entries |",
          "|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        md.append(f"| {r['variant']} | {r['patches_per_s']:,.0f} | {r['patches_per_cpu_s']:,.0f} | "
                  f"{r['peak_rss_mb']:.0f} | {r['d_entries']:,} |")  # fmt: skip
    if "paper_scale" in report:
        b = report["paper_scale"]
        md += ["", f"Paper scale: m = 65,536, k = 12, {b['patches']:,} patches, random-init SAE "
               "(compute_stats -> save -> load -> families):", "",
               f"- stats: {b['stats_wall_s']:.0f} s wall ({b['stats_cpu_s']:.0f} CPU s), "
               f"**peak RSS {b['stats_peak_rss_mb']:.0f} MB**",
               f"- files: **{b['files_bytes'] / 1e6:.0f} MB** (D: {b['d_entries']:,} entries, "
               f"{b['d_bytes'] / 1e6:.1f} MB; exemplar codes at k_max = {b['k_max']})",
               f"- families: {b['families_wall_s']:.1f} s, {b['n_edges']} edges"]  # fmt: skip
    (REPORTS / "stats-sparse-cpu.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
