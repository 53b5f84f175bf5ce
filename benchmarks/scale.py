"""Every stage after ``extract`` at several sizes: time, peak RSS, growth exponents, ImageNet estimate.

Not a test: prints figures and writes ``benchmarks/reports/scale-{cpu,gpu}.{json,md}``.

    python benchmarks/scale.py                                   # the reduced CPU grid (docs/scale.md)
    python benchmarks/scale.py --n-images 10000 40000 160000 --dict-sizes 8192 32768 65536 \\
        --grid 14 --base-m 8192 --base-n 10000                   # the issue's grid (a big machine)
    python benchmarks/scale.py --device cuda                     # GPU figures -> scale-gpu.*
    python benchmarks/scale.py --n-images 200 400 --dict-sizes 256 512 --grid 4   # seconds: debug

Two series of points share a base: n-series = every ``--n-images`` at ``--base-m`` concepts, m-series =
every ``--dict-sizes`` at ``--base-n`` images. At each point the data is synthetic but shaped like the
real thing (written in a fresh process, not timed):

- a planted dictionary: m random unit atoms in d = 512 (a random-init ``MatryoshkaSAE``'s decoder),
  a hidden forest over the concepts (a concept fires with its parent and grandparent), Zipf-like
  frequencies and per-image themes, so co-occurrence and families have real structure;
- feature shards in ``extract``'s layout (``shard_XXXXX.npy`` fp16 (images, grid^2, 512) + ids files):
  per patch 4 concepts (3 from the image's 6 themes) plus their ancestors, log-normal activations,
  plus noise;
- the "trained" SAE: that same random-init SAE (tied W_enc = W_dec = the atoms) with its global
  threshold set so ~k = 12 concepts are active per patch; ``train-sae`` itself is timed separately
  (1 epoch, batch 4096, into its own atlas) and its output is not used downstream;
- random vocabulary embeddings (``--vocab-words``, 3 parts of speech) for ``name``, class embeddings
  for ``eval-ovs``, a labels CSV (``--classes``) for ``probe``, blocky label maps for the evaluations.

Each stage runs as ``precompute.__main__.main([STAGE, ...])`` in its own process (``--threads``: its
OpenMP/MKL thread count), reaped with ``os.wait4``: the stage's wall and CPU seconds measured in the
process after the imports (importing torch, faiss, open_clip ... takes 10-20 s on a loaded 2-core
machine; the process figures are kept too), the peak RSS of that process alone (``ru_maxrss`` = VmHWM:
it counts the page cache of memory-mapped feature shards the stage has read, which the kernel drops
under pressure) and its peak anonymous memory (``RssAnon`` of ``/proc/PID/status``, sampled every
0.2 s: heap and tensors only, the memory a stage really needs; a spike shorter than 0.2 s can be
missed, VmHWM bounds it). ``--rss-cap-gb`` kills a stage whose anonymous memory passes it. A bare
interpreter importing the CLI is measured the same way (``startup``).

Exponents are least-squares slopes of log(seconds) (log(memory - startup memory) for memory) against
log(n) (n-series, n in patches) or log(m) (m-series), over all points and over the two largest (closer
to the asymptote). The estimate at ImageNet-1k (``--target-patches``, 251 M = 1.28 M images x 196) and
``--target-m`` (65,536) starts from the largest n-point: ``base + (largest n-point - base) * f_n * f_m``.

- ``f_n``: for the time of a stage that is one streaming pass over the patches (``STREAMING``), linear
  in patches, ``N / n``: at small n the fixed work (loading the SAE, the vocabulary) flattens the
  fitted exponent, and a pass over the shards is linear by construction. Otherwise (memory, and the
  stages that do not touch every patch) ``(N / n)^e_n`` with the two-largest exponent (clamped >= 0).
- ``f_m``: the measured ratio (point at ``--target-m`` / point at the n-series' m, both at the
  m-series' n) when the m-series reaches the target; otherwise ``(M / m)^e_m`` (two-largest, >= 0).

Per-image work (probe training, the image index) is overestimated by 196 / grid^2 when ``--grid`` < 14.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REPORTS = Path(__file__).resolve().parent / "reports"
D = 512
K = 12
STAGES = ("train-sae", "stats", "families", "name", "index", "image-index", "probe", "eval-ovs",
          "eval-concepts")  # fmt: skip
IMAGENET_PATCHES = 1_281_167 * 196
SHARD_IMAGES = 512
STREAMING = ("train-sae", "stats", "image-index", "probe", "eval-ovs", "eval-concepts")
"""Stages that are one streaming pass over every patch (train-sae: per epoch): time linear in patches."""
MEMORY_KEYS = ("peak_rss_mb", "peak_anon_mb")


# ------------------------------------------------------------------------------------------- data
def _world(m: int, seed: int):
    """(sae with atoms as W_dec, parent (m,) int64 with -1 at roots, Zipf-like weights (m,))."""
    import numpy as np

    from insight_core.models.sae import MatryoshkaSAE, SAEConfig

    sae = MatryoshkaSAE(SAEConfig(d_in=D, dict_size=m, k=K), seed=seed)
    rng = np.random.default_rng(seed)
    j = np.arange(m)
    parent = np.where((j >= max(1, m // 50)) & (rng.random(m) < 0.6),
                      (rng.random(m) * np.maximum(1, j // 2)).astype(np.int64), -1)  # fmt: skip
    weights = 1.0 / (rng.permutation(m) + 1.0) ** 0.9  # Zipf-like, not ordered by id (groups mix)
    return sae, parent, weights / weights.sum()


def _codes(rng, n_images: int, p: int, parent, weights):
    """(concept ids (n*p, 12), activations (n*p, 12)): 4 drawn concepts per patch + 2 ancestors each."""
    import numpy as np

    m = len(weights)
    themes = rng.choice(m, size=(n_images, 6), p=weights)
    pick = themes[np.arange(n_images)[:, None, None], rng.integers(0, 6, (n_images, p, 3))]
    extra = rng.choice(m, size=(n_images, p, 1), p=weights)
    base = np.concatenate([pick, extra], axis=2).reshape(-1, 4)
    p1 = parent[base]
    p2 = np.where(p1 >= 0, parent[np.maximum(p1, 0)], -1)
    ids = np.concatenate([base, p1, p2], axis=1)
    acts = rng.lognormal(0.5, 0.6, ids.shape).astype(np.float32) * (ids >= 0)
    return np.maximum(ids, 0), acts


def write_point(work: Path, n_images: int, m: int, grid: int, vocab_words: int, classes: int,
                seed: int = 0) -> dict:  # fmt: skip
    """Features, oracle atlas, vocabulary, class embeddings, labels and masks of one grid point."""
    import numpy as np
    import torch

    from insight_core.atlas import AtlasLayout
    from insight_core.atlas.layout import FeaturesLayout
    from insight_core.concepts.vocab_embeddings import VocabEmbeddings
    from insight_core.data.masks import MaskLabels, feature_shards, write_masks
    from insight_core.io import write_json, write_npy

    torch.manual_seed(seed)
    sae, parent, weights = _world(m, seed)
    atoms_md = sae.W_dec_md.detach().numpy()
    rng = np.random.default_rng(seed + 1)
    p = grid * grid
    fl = FeaturesLayout(work / "features")
    fl.root.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, n_images, SHARD_IMAGES)):
        n = min(SHARD_IMAGES, n_images - start)
        ids, acts = _codes(rng, n, p, parent, weights)
        feats = np.empty((n * p, D), dtype=np.float16)
        for s in range(0, n * p, 4096):
            x = np.einsum("bk,bkd->bd", acts[s : s + 4096], atoms_md[ids[s : s + 4096]])
            feats[s : s + 4096] = x + rng.normal(0, 0.05, x.shape).astype(np.float32)
        write_npy(fl.shard(shard), feats.reshape(n, p, D))
        write_json(fl.shard_ids(shard), {"ids": [f"img{i:07d}.jpg" for i in range(start, start + n)]})
    with torch.no_grad():  # the global threshold keeping ~K active per patch on this data
        x = torch.from_numpy(np.load(fl.shard(0))[: max(1, 8192 // p)].reshape(-1, D).astype(np.float32))
        pre = sae.pre_activations(x).flatten()
        sae.threshold.fill_(float(pre.kthvalue(pre.numel() - K * len(x)).values))
    layout = AtlasLayout(work / "atlas")
    layout.root.mkdir(parents=True, exist_ok=True)
    sae.save(layout.sae, config_path=layout.sae_config)

    words = tuple(f"word{i}" for i in range(vocab_words))
    emb = rng.standard_normal((3, vocab_words, D)).astype(np.float32)
    VocabEmbeddings(words, emb, ("noun", "verb", "adjective")).save_npz(work / "vocab.npz")
    names = ("background", *(f"class{i}" for i in range(1, 60)))  # PASCAL Context: 59 + background
    VocabEmbeddings(names, rng.standard_normal((1, len(names), D)).astype(np.float32), ("noun",)).save_npz(
        work / "classes.npz"
    )
    with (work / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label"])
        for i in range(n_images):
            w.writerow([f"img{i:07d}.jpg", f"c{rng.integers(0, classes)}"])
    size = 16 * grid
    labels = MaskLabels(names=names, size=(size, size), background=0, ignore=255, resize="squash",
                        grid=(grid, grid))  # fmt: skip

    def maps(sh):  # blocks of a few labels per image, some ignore
        g = max(1, grid // 2)
        coarse = rng.integers(0, len(names), (sh.n_images, g, g))
        out = np.kron(coarse, np.ones((-(-size // g), -(-size // g)), dtype=np.int64))[:, :size, :size]
        out = out.astype(np.int32)
        out[:, :2] = 255
        return out

    write_masks(work / "masks", feature_shards(fl.root), labels, maps, progress=False)
    return {"n_images": n_images, "m": m, "patches": n_images * p}


# ------------------------------------------------------------------------------------------- stages
def stage_args(stage: str, work: Path, device: str) -> list[str]:
    """The CLI arguments of one stage on one point's folders."""
    a, f = str(work / "atlas"), str(work / "features")
    dev = ["--device", device]
    quiet = ["--no-progress"]
    return {
        "train-sae": ["--features", f, "--out", str(work / "trained"), "--dict-size", str(_m(work)),
                      "--k", str(K), "--epochs", "1", "--batch-size", str(_batch(work)), *dev],
        "stats": ["--atlas", a, "--features", f, *dev],
        "families": ["--atlas", a],
        "name": ["--atlas", a, "--vocab-embeddings", str(work / "vocab.npz"), *dev],
        "index": ["--atlas", a, "--features", f],
        "image-index": ["--atlas", a, "--features", f, *dev],
        "probe": ["--atlas", a, "--features", f, "--labels", str(work / "labels.csv"), "--epochs", "20",
                  *dev],
        "eval-ovs": ["--atlas", a, "--features", f, "--masks", str(work / "masks"), "--class-embeddings",
                     str(work / "classes.npz"), *dev],
        "eval-concepts": ["--atlas", a, "--features", f, "--masks", str(work / "masks"), *dev],
    }[stage] + quiet  # fmt: skip


def _m(work: Path) -> int:
    return int(json.loads((work / "point.json").read_text())["m"])


def _batch(work: Path) -> int:
    """4096 patches, or the largest power of two under a third of a tiny point's patches."""
    patches = int(json.loads((work / "point.json").read_text())["patches"])
    return min(4096, 2 ** int(math.log2(max(2, patches // 3))))


# the stage in this process, timed after the imports (a loaded machine takes 10-20 s to import them)
STAGE_CODE = ("import json, sys, time; from precompute.__main__ import main; t = time.perf_counter(); "
              "c = time.process_time(); rc = main(sys.argv[2:]); json.dump({'rc': rc, 'wall_s': "
              "time.perf_counter() - t, 'cpu_s': time.process_time() - c}, open(sys.argv[1], 'w')); "
              "sys.exit(rc)")  # fmt: skip


def _anon_kb(pid: int) -> int:
    """The process's anonymous resident memory (``RssAnon``: not file-backed pages) in kB, 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(line.split()[1]) for line in fh if line.startswith("RssAnon")), 0)
    except OSError:  # gone, or no /proc
        return 0


def measure(cmd: list[str], log: Path, rss_cap_gb: float = 0.0, threads: int = 0) -> dict:
    """Run ``cmd`` in its own process; wall s, CPU s, peak RSS (VmHWM, MB) and peak anonymous memory
    (``RssAnon`` sampled every 0.2 s, MB) of that process alone. Anonymous memory above ``rss_cap_gb``
    (0: no cap) kills it (rc -9), so a stage that would exhaust a shared machine's memory fails alone;
    page cache of memory-mapped shards does not count (the kernel reclaims it). ``threads`` > 0 sets
    its OpenMP/MKL thread count."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads > 0:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    peak_anon = 0
    with log.open("ab") as out:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak_anon = max(peak_anon, _anon_kb(proc.pid))
            if rss_cap_gb and peak_anon > rss_cap_gb * 2**20:
                proc.kill()
            time.sleep(0.2)
        wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024, "peak_anon_mb": peak_anon / 1024}  # fmt: skip


def du_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6 if path.exists() else 0.0


def run_point(work: Path, n: int, m: int, args, log: Path) -> dict:
    """Write one point's data (fresh process, untimed), then time every stage on it."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / "point.json").write_text(json.dumps({"n": n, "m": m, "patches": n * args.grid**2}))
    gen = [sys.executable, __file__, "--worker-write", str(work), "--n-images", str(n),
           "--dict-sizes", str(m), "--grid", str(args.grid), "--vocab-words", str(args.vocab_words),
           "--classes", str(args.classes)]  # fmt: skip
    g = measure(gen, log)
    if g["rc"]:
        raise SystemExit(f"data for n={n}, m={m} failed; see {log}")
    point = {"n_images": n, "m": m, "patches": n * args.grid**2, "write_s": g["wall_s"],
             "features_mb": du_mb(work / "features"), "stages": {}}  # fmt: skip
    for stage in args.stages:
        res = work / f"{stage}.result.json"
        cmd = [sys.executable, "-c", STAGE_CODE, str(res), stage, *stage_args(stage, work, args.device)]
        proc = measure(cmd, log, args.rss_cap_gb, args.threads)
        if res.is_file():  # the in-process times, the process's peak memory
            r = {**json.loads(res.read_text()), "process_wall_s": proc["wall_s"],
                 "process_cpu_s": proc["cpu_s"], "peak_rss_mb": proc["peak_rss_mb"],
                 "peak_anon_mb": proc["peak_anon_mb"]}  # fmt: skip
        else:  # died before writing its result
            r = {**proc, "rc": proc["rc"] or 1}
        if stage == "train-sae":
            r["out_mb"] = du_mb(work / "trained")
        point["stages"][stage] = r
        state = "ok" if r["rc"] == 0 else f"FAILED rc={r['rc']} (see {log})"
        print(f"  n={n:>7,} m={m:>6,} {stage:14s} {r['wall_s']:8.1f} s wall {r['cpu_s']:8.1f} s CPU "
              f"{r['peak_rss_mb']:7.0f} MB RSS {r['peak_anon_mb']:7.0f} MB anon  {state}",
              flush=True)  # fmt: skip
    point["atlas_mb"] = du_mb(work / "atlas")
    point["stats_mb"] = du_mb(work / "atlas" / "stats")
    if not args.keep:
        shutil.rmtree(work)
    return point


# ------------------------------------------------------------------------------------------- fits
def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) on log(x); None with fewer than 2 distinct x or y <= 0."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def fit(series_n: list[dict], series_m: list[dict], stage: str, key: str, base: float,
        target_patches: float, target_m: float) -> dict:  # fmt: skip
    """Exponents in n (patches) and m of ``key - base`` (all points, and the two largest, closest to
    the asymptote), and the estimate at the target (module docstring: linear in patches for the time
    of a streaming stage, the measured m ratio when the m-series reaches the target)."""
    floor = max(base * 0.01, 1e-3)

    def inc(p: dict) -> float:
        return max(p["stages"][stage][key] - base, floor)

    # a stage that failed (killed over --rss-cap-gb, or its input missing) gives no figure to fit
    series_n = [p for p in series_n if p["stages"].get(stage, {}).get("rc") == 0]
    series_m = [p for p in series_m if p["stages"].get(stage, {}).get("rc") == 0]
    if not series_n:
        return {"exp_n": None, "exp_m": None, "exp_n_top": None, "exp_m_top": None, "estimate": float("nan")}

    def exps(series: list[dict], x: str) -> tuple[float | None, float | None]:
        top = sorted(series, key=lambda p: p[x])[-2:]
        return (slope([p[x] for p in series], [inc(p) for p in series]),
                slope([p[x] for p in top], [inc(p) for p in top]))  # fmt: skip

    e_n, e_n_top = exps(series_n, "patches")
    e_m, e_m_top = exps(series_m, "m")
    top = max(series_n, key=lambda p: p["patches"])
    linear = stage in STREAMING and key not in MEMORY_KEYS
    est = inc(top) * (target_patches / top["patches"]) ** (1.0 if linear else max(e_n_top or 0.0, 0.0))
    at = {p["m"]: p for p in series_m}
    measured_m = target_m in at and top["m"] in at
    if measured_m:  # the m-series' ratio between the two m
        est *= inc(at[target_m]) / inc(at[top["m"]])
    else:
        est *= (target_m / top["m"]) ** max(e_m_top or 0.0, 0.0)
    return {"exp_n": e_n, "exp_m": e_m, "exp_n_top": e_n_top, "exp_m_top": e_m_top, "estimate": base + est,
            "rule": ("linear n" if linear else "power n") + (", measured m" if measured_m else "")}


def fit_all(series_n: list[dict], series_m: list[dict], stages: list[str], startup: dict,
            target_patches: float, target_m: float) -> dict:  # fmt: skip
    """``fit`` of every stage and figure; times are in-process (no import cost), memory less the imports'."""
    base = {"wall_s": 0.0, "cpu_s": 0.0, "peak_rss_mb": startup["peak_rss_mb"]}
    if "peak_anon_mb" in startup:  # reports before anonymous memory was sampled have none
        base["peak_anon_mb"] = startup["peak_anon_mb"]
    return {s: {key: fit(series_n, series_m, s, key, base[key], target_patches, target_m) for key in base}
            for s in stages}  # fmt: skip


# ------------------------------------------------------------------------------------------- report
def _fmt_s(s: float) -> str:
    if s >= 365 * 86400:
        return f"{s / (365 * 86400):,.1f} y"
    if s >= 86400:
        return f"{s / 86400:.1f} d"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def _fmt_mb(mb: float) -> str:
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def _e(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _cell(fmt, run: dict, key: str) -> str:
    """One stage's figure; a failed run says so (killed: the figure where it was stopped)."""
    if run.get("rc") == 0:
        return fmt(run[key])
    return f"failed ({'killed at ' if run.get('rc') in (-9, 137) else ''}{fmt(run[key])})"


def markdown(report: dict) -> str:
    a = report["args"]
    ram = report["ram_limit_gb"]
    md = [f"# Every stage at scale ({report['device']}, {report['torch_threads']} threads)", "",
          f"**Machine: {report['machine']}; load average at start {report['load_start'][0]:.1f}, at end "
          f"{report['load_end'][0]:.1f}.** {report['note']}", "",
          f"Grid run: n-series n = {', '.join(f'{n:,}' for n in a['n_images'])} images at "
          f"m = {a['base_m']:,}; "
          f"m-series m = {', '.join(f'{m:,}' for m in a['dict_sizes'])} at n = {a['base_n']:,} images; "
          f"{a['grid']}x{a['grid']} = {a['grid'] ** 2} patches per image, d = {D}, ~{K} active concepts per "
          f"patch, vocabulary {a['vocab_words']:,} words x 3 parts of speech, {a['classes']} probe classes "
          f"(20 epochs). Startup (interpreter + CLI imports): {report['startup']['wall_s']:.1f} s, "
          f"{report['startup']['peak_rss_mb']:.0f} MB.", "",
          f"Times are the stage's own (in its process, after the imports); memory is the whole process's: "
          f"peak RSS (VmHWM, page cache of memory-mapped shards included) and peak anonymous memory "
          f"(RssAnon sampled every 0.2 s: what the stage needs). Exponents (log-log least squares; n counted "
          f"in patches) are 'all points / the two largest', memory ones on memory - startup memory. The "
          f"estimate at ImageNet-1k ({report['target_patches'] / 1e6:,.0f} M patches) and "
          f"m = {report['target_m']:,} starts from the largest n-point: time of a streaming stage "
          f"({', '.join(STREAMING)}) linear in patches, otherwise the two-largest n exponent; times the "
          f"measured ratio between the m-series' points at m = {report['target_m']:,} and at the n-series' m "
          f"when the grid reaches it (else the two-largest m exponent). The memory limit is checked on "
          f"anonymous memory.", ""]  # fmt: skip
    pts_n, pts_m = report["series_n"], report["series_m"]
    head = ["stage", *[f"n={p['n_images']:,}" for p in pts_n], "exp n",
            *[f"m={p['m']:,}" for p in pts_m], "exp m", "ImageNet + 65k"]  # fmt: skip
    tables = [("Wall time", "wall_s", _fmt_s), ("CPU time (user + system)", "cpu_s", _fmt_s),
              ("Peak RSS (VmHWM)", "peak_rss_mb", _fmt_mb)]  # fmt: skip
    has_anon = "peak_anon_mb" in report["startup"]
    if has_anon:
        tables.append(("Peak anonymous memory (RssAnon)", "peak_anon_mb", _fmt_mb))
    limit_key = "peak_anon_mb" if has_anon else "peak_rss_mb"
    for title, key, fmt in tables:
        md += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for stage in a["stages"]:
            f = report["fits"][stage][key]
            cells = [_cell(fmt, p["stages"][stage], key) for p in pts_n]
            cells.append(f"{_e(f['exp_n'])} / {_e(f['exp_n_top'])}")
            cells += [_cell(fmt, p["stages"][stage], key) for p in pts_m]
            cells.append(f"{_e(f['exp_m'])} / {_e(f['exp_m_top'])}")
            flag = ""
            if key != "peak_rss_mb" and (f["exp_n_top"] or 0) > 1.1:
                flag = " (exp n > 1.1)"
            if key == limit_key and f["estimate"] > ram * 1024:
                flag = f" (> {ram} GB)"
            md.append(f"| {stage} | " + " | ".join(cells) + f" | **{fmt(f['estimate'])}**{flag} |")
        md.append("")
    md += ["## Files", "", "| point | features | atlas | stats/ |", "|---|---|---|---|"]
    for p in {(q["n_images"], q["m"]): q for q in (*pts_n, *pts_m)}.values():
        md.append(f"| n={p['n_images']:,}, m={p['m']:,} | {_fmt_mb(p['features_mb'])} | "
                  f"{_fmt_mb(p['atlas_mb'])} | {_fmt_mb(p['stats_mb'])} |")  # fmt: skip
    md += ["", f"`{report['command']}`", ""]
    return "\n".join(md)


# ------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, nargs="+", default=[1000, 4000, 16000], help="n-series sizes")
    ap.add_argument("--dict-sizes", type=int, nargs="+", default=[2048, 8192, 32768], help="m-series sizes")
    ap.add_argument("--base-m", type=int, default=None, help="m of the n-series (default: smallest m)")
    ap.add_argument("--base-n", type=int, default=None, help="images of the m-series (default: smallest n)")
    ap.add_argument("--grid", type=int, default=7, help="patch grid side (14 = the paper's 196 patches)")
    ap.add_argument("--vocab-words", type=int, default=20000)
    ap.add_argument("--classes", type=int, default=100, help="probe classes")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep each point's folders")
    ap.add_argument("--target-patches", type=float, default=IMAGENET_PATCHES)
    ap.add_argument("--target-m", type=int, default=65536)
    ap.add_argument("--ram-gb", type=float, default=24.0, help="memory the estimate is checked against")
    ap.add_argument("--rss-cap-gb", type=float, default=12.0,
                    help="kill a stage above this RSS (0: no cap); it is reported as failed")
    ap.add_argument("--threads", type=int, default=0,
                    help="OpenMP/MKL threads of each stage process (0: the library default)")
    ap.add_argument("--note", default="", help="a line for the report (e.g. how loaded the machine was)")
    ap.add_argument("--name", default=None, help="report name (default: scale-cpu / scale-gpu)")
    ap.add_argument("--render", type=Path, default=None, help="only rewrite the .md of a JSON report")
    ap.add_argument("--worker-write", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.render:  # refit (older reports fitted failed stages too) and rewrite the markdown
        report = json.loads(args.render.read_text())
        report["fits"] = fit_all(report["series_n"], report["series_m"], report["args"]["stages"],
                                 report["startup"], report["target_patches"], report["target_m"])  # fmt: skip
        args.render.write_text(json.dumps(report, indent=1) + "\n")
        args.render.with_suffix(".md").write_text(markdown(report))
        return 0
    if args.worker_write:
        write_point(args.worker_write, args.n_images[0], args.dict_sizes[0], args.grid, args.vocab_words,
                    args.classes)  # fmt: skip
        return 0

    args.base_m = args.base_m or min(args.dict_sizes)
    args.base_n = args.base_n or min(args.n_images)
    tag = "gpu" if args.device.startswith("cuda") else "cpu"
    name = args.name or f"scale-{tag}"
    work = args.work or Path(tempfile.mkdtemp(prefix="insight-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"{name}.log"  # the stages' output (kept with the scratch folder)
    REPORTS.mkdir(exist_ok=True)
    log.write_text("")
    load_start = os.getloadavg()
    startup = measure([sys.executable, "-c", "import precompute.__main__"], log, threads=args.threads)
    print(f"startup: {startup['wall_s']:.1f} s, {startup['peak_rss_mb']:.0f} MB; log -> {log}", flush=True)
    # the m-series first (the largest m is the point most at risk); the report is rewritten after each
    # point, so a run stopped early still leaves the points it finished
    pairs = [(args.base_n, m) for m in args.dict_sizes]
    pairs += [(n, args.base_m) for n in args.n_images if (n, args.base_m) not in pairs]
    done: dict[tuple[int, int], dict] = {}
    t0 = time.perf_counter()
    failed: list = []
    for n, m in pairs:
        done[(n, m)] = run_point(work / f"n{n}-m{m}", n, m, args, log)
        failed = [(k, s) for k, p in done.items() for s, r in p["stages"].items() if r["rc"]]
        report = _report(args, done, startup, load_start, time.perf_counter() - t0, failed, tag)
        (REPORTS / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
        (REPORTS / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    if failed:
        print(f"FAILED stages: {report['failed']} (see {log})")
    return 1 if failed else 0


def _report(args, done: dict, startup: dict, load_start, total_s: float, failed: list, tag: str) -> dict:
    """The report of the points finished so far."""
    import torch

    series_n = [done[(n, args.base_m)] for n in args.n_images if (n, args.base_m) in done]
    series_m = [done[(args.base_n, m)] for m in args.dict_sizes if (args.base_n, m) in done]
    fits = fit_all(series_n, series_m, args.stages, startup, args.target_patches, args.target_m)
    dev = torch.cuda.get_device_name(0) if tag == "gpu" and torch.cuda.is_available() else "cpu"
    threads = args.threads or torch.get_num_threads()
    return {
        "device": dev, "torch_threads": threads, "machine": f"{os.cpu_count()} CPU cores, "
        f"{platform.machine()}, shared with other users" if tag == "cpu" else dev,
        "note": args.note, "load_start": load_start, "load_end": os.getloadavg(),
        "total_s": total_s,
        "command": " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]]),
        "args": {"n_images": args.n_images, "dict_sizes": args.dict_sizes, "base_m": args.base_m,
                 "base_n": args.base_n, "grid": args.grid, "vocab_words": args.vocab_words,
                 "classes": args.classes, "stages": args.stages, "device": args.device,
                 "threads": args.threads},
        "startup": startup, "target_patches": args.target_patches, "target_m": args.target_m,
        "ram_limit_gb": args.ram_gb, "series_n": series_n, "series_m": series_m, "fits": fits,
        "failed": [f"n={k[0]} m={k[1]} {s}" for k, s in failed],
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
