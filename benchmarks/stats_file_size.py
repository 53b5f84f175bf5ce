"""Bytes of a statistics file by part, as it is and rewritten in the current format (version 4).

Not a test: prints figures and writes ``benchmarks/reports/stats-file-size.{json,md}``.

    python benchmarks/scale.py --n-images 250 --dict-sizes 32768 --stages stats --keep --work W
    python benchmarks/stats_file_size.py W/n250-m32768/atlas/stats   # (a file of any version)

The folder's ``concept_stats.{safetensors,json}`` are loaded (versions 1-4), saved again in the
current format into a temporary folder, and both files are split into co-occurrence (``D_*``),
exemplar codes (``ex_code_*``) and the rest; the exemplar codes read back from the rewrite are
checked to equal the original's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REPORTS = Path(__file__).resolve().parent / "reports"


def parts_mb(path: Path) -> dict[str, float]:
    """MB of a safetensors file's tensors: D, exemplar codes, rest, and the whole file."""
    from safetensors import safe_open

    out = {"D": 0.0, "exemplar codes": 0.0, "rest": 0.0}
    with safe_open(str(path), "pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            t = f.get_tensor(name)
            part = "D" if name.startswith("D_") else "rest"
            part = "exemplar codes" if name.startswith("ex_code_") else part
            out[part] += t.numel() * t.element_size() / 1e6
    return out | {"file": path.stat().st_size / 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stats_dir", type=Path, help="a folder with concept_stats.safetensors and .json")
    ap.add_argument("--name", default="stats-file-size", help="report name")
    args = ap.parse_args()
    import torch

    from insight_core.concepts.stats_file import ConceptStats

    st_path, meta_path = args.stats_dir / "concept_stats.safetensors", args.stats_dir / "concept_stats.json"
    meta = json.loads(meta_path.read_text())
    stats = ConceptStats.load(st_path, meta_path)
    with tempfile.TemporaryDirectory() as tmp:
        new_st, new_meta = Path(tmp) / st_path.name, Path(tmp) / meta_path.name
        stats.save(new_st, new_meta)
        new_doc = json.loads(new_meta.read_text())
        back = ConceptStats.load(new_st, new_meta)
        same = all(torch.equal(getattr(stats, f), getattr(back, f))
                   for f in ("ex_code_ptr_g1", "ex_code_cols_e", "ex_code_vals_e"))  # fmt: skip
        report = {
            "source": str(args.stats_dir), "m": meta["m"], "n_patches": meta["n_patches"],
            "k_max": meta["k_max"], "codes_identical": same,
            "before": {"version": meta["version"], "exemplar_codes": meta.get("exemplar_codes"),
                       "mb": parts_mb(st_path)},
            "after": {"version": new_doc["version"], "exemplar_codes": new_doc["exemplar_codes"],
                      "mb": parts_mb(new_st)},
        }  # fmt: skip
    b, a = report["before"], report["after"]
    md = [f"# Statistics file size by part: version {b['version']} -> {a['version']}", "",
          f"m = {report['m']:,}, {report['n_patches']:,} patches, k_max = {report['k_max']:,} "
          f"(most active concepts on a kept exemplar patch); exemplar codes identical after the "
          f"rewrite: {same}.", "",
          "| part | before (MB) | after (MB) |", "|---|---|---|"]  # fmt: skip
    md += [f"| {k} | {b['mb'][k]:,.1f} | {a['mb'][k]:,.1f} |" for k in b["mb"]]
    md += ["", f"Exemplar code entries: {b['exemplar_codes']} -> {a['exemplar_codes']}.", "",
           f"`python benchmarks/stats_file_size.py {args.stats_dir}`", ""]  # fmt: skip
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (REPORTS / f"{args.name}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
