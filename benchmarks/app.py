"""Explorer app benchmark (not a test): latency, memory and concurrency of the launched app on CPU.

    nice taskset -c 0,1 .venv/bin/python benchmarks/app.py --atlas demo_atlas [--threads 2]
    nice taskset -c 0,1 .venv/bin/python benchmarks/app.py --synthetic 8192   # a full-size atlas

Measures through gradio_client against a locally launched app: upload -> heatmaps (/explain) p50/p90,
upload -> explained classification (/classify: the atlas's largest probe, and zero-shot; atlases with
probes, e.g. ``benchmarks/probe.py --large-atlas DIR``), open-vocabulary segmentation with concept
explanations (/segment) p50/p90 with cached class names and the cold cost of new ones, concept page
(/concept, JSON with the histogram, range exemplars and co-occurrence) and the concept page as the UI
renders it (HTML, histogram figure, exemplar cards; in-process), the families overview (first
computation, then cached), family graph HTML of the largest family and of a synthetic 200-node DAG
(the browser's layout is timed by benchmarks/family_layout.py), steady RSS, and 20 concurrent
/explain requests. ``--synthetic M`` first builds (or reuses) the synthetic atlas of
benchmarks/synthetic_atlas.py with M concepts: random weights, realistic sizes. Writes
benchmarks/reports/app-cpu.{json,md} (``app-cpu-synthetic-M`` with ``--synthetic``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
TARGETS = {"explain_p50_s": 1.0, "segment_p50_s": 1.0, "concept_p50_s": 0.3, "family_s": 1.0, "rss_gb": 4.0,
           "classify_p50_s": 1.0}  # fmt: skip
ZERO_SHOT_LABELS = "bird, motorcycle, horse, pizza, clock, noodles, beach, kitchen, street, dog"
SEGMENT_CLASSES = "horse, person, sand, sea, sky, bird, motorcycle, road, kitchen, pizza, clock, building"


def _timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--atlas", default="demo_atlas")
    ap.add_argument("--synthetic", type=int, default=None, metavar="M",
                    help="build (or reuse) a synthetic atlas with M concepts and benchmark that")  # fmt: skip
    ap.add_argument("--synthetic-dir", default=None, help="where the synthetic atlas lives")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import psutil
    import torch
    from gradio_client import Client, handle_file
    from synthetic_atlas import build as build_synthetic
    from synthetic_atlas import synthetic_family

    from app import families as F
    from app.server import create_demo, example_images
    from app.tabs.concepts import concept_outputs

    reports = ROOT / "benchmarks" / "reports"
    if args.synthetic:
        folder = Path(args.synthetic_dir or f"/tmp/insight-synthetic-{args.synthetic}")
        args.atlas = str(build_synthetic(folder, args.synthetic))
        args.out = args.out or str(reports / f"app-cpu-synthetic-{args.synthetic}")
    args.out = args.out or str(reports / "app-cpu")
    torch.set_num_threads(args.threads)
    demo, views = create_demo(args.atlas)
    if views.state is None:
        print(f"atlas failed to load: {views.load_error}", file=sys.stderr)
        return 1
    state = views.state
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    client = Client(url, verbose=False)
    examples = example_images()
    proc = psutil.Process(os.getpid())

    client.predict(handle_file(examples[0]), 8, -1, api_name="/explain")  # warm-up
    i = iter(range(10**6))
    explain = _timed(lambda: client.predict(handle_file(examples[next(i) % len(examples)]), 8, -1,
                                            api_name="/explain"), args.n)  # fmt: skip
    classify = _bench_classify(client, state, examples, args.n)
    seg = lambda classes, bg=True: client.predict(  # noqa: E731
        handle_file(examples[next(i) % len(examples)]), classes, bg, api_name="/segment"
    )
    seg(SEGMENT_CLASSES)  # warm-up: embeds the class names once (then cached)
    segment = _timed(lambda: seg(SEGMENT_CLASSES), args.n)
    cold = _timed(lambda: seg(f"thing {next(i)}, other {next(i)}", False), 3)  # two new class names each
    # concept pages: the most frequent concepts and as many random active ones
    active = [int(c) for c in state.concepts.index if state.concepts.at[c, "freq_patches"] > 0]
    cids = list(state.concepts.sort_values("frequency", ascending=False).index[: args.n])
    cids += random.Random(0).sample(active, min(args.n, len(active)))
    j = iter(cids)
    concept = _timed(lambda: client.predict(str(next(j)), api_name="/concept"), len(cids))
    k = iter(cids)
    concept_ui = _timed(lambda: concept_outputs(views, next(k)), len(cids))
    t = time.perf_counter()
    overview_bytes = len(F.overview_plot_json(state, "sunburst"))
    overview_first = time.perf_counter() - t
    overview_cached = _timed(lambda: F.overview_plot_json(state, "sunburst"), 5)
    # the largest family (ancestors + descendants, depth 6) among the concepts with most children
    kids = sorted(state.concepts.index, key=lambda c: -len(state.families.children(int(c))))[:200]
    sizes = [(len(state.families.family_of(int(c), 6).nodes), int(c)) for c in kids]
    n_nodes, big = max(sizes)
    family = _timed(lambda: F.graph_html(F.family_data(state, big, 6)), 5)
    family200 = _timed(lambda: F.graph_html(synthetic_family(200)), 5)  # atlases may have no 200-node family
    rss_steady = proc.memory_info().rss / 2**30

    def one(k: int) -> bool:
        out = client.predict(handle_file(examples[k % len(examples)]), 5, -1, api_name="/explain")
        return bool(out["top_concepts"])

    t = time.perf_counter()
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda k: _safe(one, k), range(20)))
    concurrent_s = time.perf_counter() - t
    rss_peak = max(rss_steady, proc.memory_info().rss / 2**30)
    demo.close()

    report = {
        "atlas": str(state.atlas.root),
        "backbone": state.atlas.backbone.get("arch"),
        "random_weights": state.random_weights,
        "n_concepts": state.m,
        "torch_threads": args.threads,
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "load_average_1min": os.getloadavg()[0],
        "explain_p50_s": statistics.median(explain),
        "explain_p90_s": sorted(explain)[int(0.9 * (len(explain) - 1))],
        "segment_classes": SEGMENT_CLASSES.count(",") + 2,
        "segment_p50_s": statistics.median(segment),
        "segment_p90_s": sorted(segment)[int(0.9 * (len(segment) - 1))],
        "segment_two_new_classes_s": statistics.median(cold),
        "concept_p50_s": statistics.median(concept),
        "concept_p90_s": sorted(concept)[int(0.9 * (len(concept) - 1))],
        "concept_ui_p50_s": statistics.median(concept_ui),
        "concept_ui_p90_s": sorted(concept_ui)[int(0.9 * (len(concept_ui) - 1))],
        "concepts_timed": len(cids),
        "overview_first_s": overview_first,
        "overview_cached_s": statistics.median(overview_cached),
        "overview_json_kb": overview_bytes / 1024,
        "family_nodes": n_nodes,
        "family_s": statistics.median(family),
        "family200_s": statistics.median(family200),
        "rss_steady_gb": rss_steady,
        "rss_peak_gb": rss_peak,
        "concurrent_20_ok": sum(r is True for r in results),
        "concurrent_20_errors": [r for r in results if r is not True],
        "concurrent_20_wall_s": concurrent_s,
        **classify,
    }
    ok = {
        "explain_p50_s": report["explain_p50_s"] <= TARGETS["explain_p50_s"],
        "segment_p50_s": report["segment_p50_s"] <= TARGETS["segment_p50_s"],
        "concept_p50_s": report["concept_p50_s"] <= TARGETS["concept_p50_s"],
        "concept_ui_p50_s": report["concept_ui_p50_s"] <= TARGETS["concept_p50_s"],
        "family_s": report["family_s"] <= TARGETS["family_s"],
        "family200_s": report["family200_s"] <= TARGETS["family_s"],
        "rss_gb": report["rss_steady_gb"] <= TARGETS["rss_gb"],
        "concurrent": report["concurrent_20_ok"] == 20,
    }
    if "classify_p50_s" in report:
        ok["classify_p50_s"] = report["classify_p50_s"] <= TARGETS["classify_p50_s"]
    report["targets_met"] = ok
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(report, indent=1))
    md = [
        "# App benchmark (CPU)", "",
        f"Atlas `{report['atlas']}` ({report['n_concepts']} concepts, backbone {report['backbone']}, "
        f"random weights: {report['random_weights']}), torch threads {args.threads}, "
        f"CPUs {report['cpu_affinity']}, load average {report['load_average_1min']:.1f} at the end.", "",
        "| metric | value | target | met |", "|---|---|---|---|",
        f"| upload -> heatmaps (/explain) p50 | {report['explain_p50_s']:.3f} s "
        f"(p90 {report['explain_p90_s']:.3f}) "
        f"| <= 1.0 s | {ok['explain_p50_s']} |",
        f"| segment + explain (/segment, {report['segment_classes']} classes incl. background, cached "
        f"class names) p50 | {report['segment_p50_s']:.3f} s (p90 {report['segment_p90_s']:.3f}) | <= 1.0 s "
        f"| {ok['segment_p50_s']} |",
        f"| /segment with two new class names (text encoder, one template) | "
        f"{report['segment_two_new_classes_s']:.3f} s | - | - |",
        f"| concept page with histogram (/concept, JSON) p50 over {len(cids)} concepts "
        f"| {1000 * report['concept_p50_s']:.0f} ms (p90 {1000 * report['concept_p90_s']:.0f}) | <= 300 ms "
        f"| {ok['concept_p50_s']} |",
        f"| concept page as rendered (HTML + histogram + exemplar cards, in-process) p50 "
        f"| {1000 * report['concept_ui_p50_s']:.0f} ms (p90 {1000 * report['concept_ui_p90_s']:.0f}) "
        f"| <= 300 ms | {ok['concept_ui_p50_s']} |",
        f"| families overview (sunburst, {report['overview_json_kb']:.0f} kB) first / cached "
        f"| {1000 * overview_first:.0f} ms / {1000 * report['overview_cached_s']:.1f} ms | | |",
        f"| family graph ({n_nodes} nodes) | {report['family_s']:.3f} s | <= 1 s (200 nodes) "
        f"| {ok['family_s']} |",
        "| family graph HTML, synthetic 200-node DAG (server side; the layout in Chromium: "
        "benchmarks/family_layout.py) "
        f"| {report['family200_s']:.3f} s | <= 1 s | {ok['family200_s']} |",
        f"| steady RSS | {report['rss_steady_gb']:.2f} GB (peak {rss_peak:.2f}) | <= 4 GB | {ok['rss_gb']} |",
        f"| 20 concurrent /explain | {report['concurrent_20_ok']}/20 ok in {concurrent_s:.1f} s | no errors "
        f"| {ok['concurrent']} |",
    ]  # fmt: skip
    if "classify_p50_s" in report:
        md += [
            f"| upload -> classify + explanation (/classify, probe {report['classify_probe']}, "
            f"{report['classify_classes']} classes) p50 | {report['classify_p50_s']:.3f} s "
            f"(p90 {report['classify_p90_s']:.3f}) | <= 1.0 s | {ok['classify_p50_s']} |",
            f"| /classify zero-shot, 10 typed labels, p50 | {report['zero_shot_p50_s']:.3f} s | | |",
            f"| what /classify adds to /explain (in process; probe / zero-shot) | "
            f"{1000 * report['classify_over_explain_s']:.0f} ms / "
            f"{1000 * report['zero_shot_over_explain_s']:.0f} ms | | |",
        ]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def _bench_classify(client, state, examples: list[str], n: int) -> dict:
    """/classify latency with the atlas's largest probe, and zero-shot with 10 labels (when it has probes)."""
    from gradio_client import handle_file

    if not state.probes:
        return {}
    probe = max(state.probes, key=lambda name: state.probes[name].cfg.n_classes)
    i = iter(range(10**6))

    def call(classifier: str, labels: str) -> None:
        image = handle_file(examples[next(i) % len(examples)])
        client.predict(image, classifier, labels, 8, api_name="/classify")

    call(probe, "")  # warm-up (and the label embeddings' cache below)
    call("zero-shot", ZERO_SHOT_LABELS)
    with_probe = _timed(lambda: call(probe, ""), n)
    zero = _timed(lambda: call("zero-shot", ZERO_SHOT_LABELS), n)
    # what /classify adds to /explain (backbone + SAE), in process: classification + explanation JSON
    from app import classify as K
    from app import explain as X

    expl = X.explain_image(state, X.read_image(examples[0]))
    extra = _timed(lambda: K.api_doc(state, K.classify(state, expl, probe), None, 8), n)
    extra_zs = _timed(lambda: K.api_doc(state, K.classify(state, expl, K.ZERO_SHOT, ZERO_SHOT_LABELS)), n)
    return {
        "classify_probe": probe,
        "classify_classes": state.probes[probe].cfg.n_classes,
        "classify_p50_s": statistics.median(with_probe),
        "classify_p90_s": sorted(with_probe)[int(0.9 * (len(with_probe) - 1))],
        "zero_shot_p50_s": statistics.median(zero),
        "classify_over_explain_s": statistics.median(extra),
        "zero_shot_over_explain_s": statistics.median(extra_zs),
    }


def _safe(fn, k: int) -> bool | str:
    try:
        return fn(k)
    except Exception as err:  # report, do not abort the benchmark
        return f"{type(err).__name__}: {err}"


if __name__ == "__main__":
    sys.exit(main())
