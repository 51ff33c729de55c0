"""Re-fit stage 2 on finished experiments' own stage-1 models with other `fuse` settings, and
compare the new fused predictions with the runs' `view_group` and fused ones, seed by seed.

`cxrlt compare` pairs whole experiments; this asks a narrower question without re-running
stage 1: "had the fuse stage of these runs used `fuse.<key>=<value>`?". For each named
experiment it takes that run's `models/stage1.pt` and predictions file from the DVC cache
(`dvc exp run` stored them), fits the fusion model with the run's seed and this workspace's
params plus the overrides (epoch chosen on val, as the stage does), predicts val/dev/test,
and prints per split: mean ± SD over the runs of mAP and the group mAPs of each variant,
and the paired study-bootstrap difference averaged over the runs (percentile interval,
fraction of replicates with Δ ≤ 0). Decide on val and dev; test only reports.

    python bench/refit_fusion.py cas-s0 cas-s1 cas-s2 --set sampler=class_aware [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from cxrlt.compare import _groups_from, paired_bootstrap, paired_difference
from cxrlt.data.cache import ImageCache
from cxrlt.data.manifest import label_matrix
from cxrlt.errors import DataError
from cxrlt.inference import StudyTable, load_checkpoint, load_fusion_checkpoint, resolve_device
from cxrlt.params import load_params
from cxrlt.postprocess import level_scores
from cxrlt.training.fusion import fit_fusion


def cached_out(exp: str, path: str) -> tuple[Path, dict]:
    """The DVC-cache file of output `path` of experiment `exp`, and that run's params."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], capture_output=True,
                          text=True, check=True).stdout.split()  # fmt: skip
    ref = next((r for r in refs if r.rsplit("/", 1)[-1] == exp), None)
    if ref is None:
        raise DataError(f"no experiment named {exp!r} (dvc exp list --all-commits)")
    show = lambda f: subprocess.run(["git", "show", f"{ref}:{f}"], capture_output=True, text=True, check=True).stdout  # noqa: E731
    for stage in yaml.safe_load(show("dvc.lock"))["stages"].values():
        for out in stage.get("outs", []):
            if out["path"] == path:
                md5 = out["md5"]
                return Path(".dvc/cache/files/md5") / md5[:2] / md5[2:], yaml.safe_load(show("params.yaml"))
    raise DataError(f"{exp}: no output {path} in its dvc.lock")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--set", action="append", default=[], help="fuse.<key>=<value> override (YAML value)")
    ap.add_argument("--out", default=None, help="keep the re-fitted checkpoints here")
    ap.add_argument("--n-bootstrap", type=int, default=1000)
    args = ap.parse_args()
    base = load_params()
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    manifest = pd.read_parquet(base["data"]["manifest"])
    rows = manifest[manifest["split"].isin(["val", "dev", "test"])].reset_index(drop=True)
    cache = ImageCache(base["cache"]["dir"])
    device = resolve_device("auto")
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="refit-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    for name in args.runs:
        stage1, run_params = cached_out(name, "models/stage1.pt")
        preds_file, _ = cached_out(name, run_params["predict"]["out"])
        params = copy.deepcopy(base)
        params.update({k: run_params[k] for k in ("seed", "sampler", "samplers", "loss", "losses") if k in run_params})
        params["fuse"] = {**params["fuse"], **overrides}
        classes = list(load_checkpoint(stage1)[1]["classes"])
        info = fit_fusion(manifest, classes, base["cache"]["dir"], stage1, params, out_dir / f"{name}.pt")
        model, finfo = load_fusion_checkpoint(out_dir / f"{name}.pt")
        fused = StudyTable(rows, classes, int(finfo["fusion"]["max_views"])).predict(model.to(device), cache, 128, device)
        preds = pd.read_parquet(preds_file).set_index("image_id").loc[rows["image_id"]].reset_index()
        runs.append((classes, preds, fused))
        print(f"{name}: seed {params['seed']}, val mAP {info['val_mAP']:.4f} at epoch {info['best_epoch']}", flush=True)
    classes = runs[0][0]
    groups = _groups_from(manifest, classes)
    names = ["view_group", "fused (the run's)", f"fused ({', '.join(args.set) or 'as params.yaml'})"]
    for split in ("val", "dev", "test"):
        sel = (rows["split"] == split).to_numpy()
        y = label_matrix(rows[sel], classes)
        scores = []
        for _, preds, fused in runs:
            part = preds[sel]
            scores += [level_scores(part, classes, "view_group"), level_scores(part, classes, "fused"), fused[sel]]
        pb = paired_bootstrap(y, scores, classes, groups, ids=rows.loc[sel, "study_id"].to_numpy(),
                              n_bootstrap=args.n_bootstrap, seed=0)  # fmt: skip
        n = len(runs)
        print(f"\n{split} ({int(sel.sum())} images), mean ± SD over {n} runs:")
        for j, label in enumerate(names):
            pts = pb.point[[3 * k + j for k in range(n)]]
            cells = "  ".join(f"{key} {pts[:, g].mean():.4f} ± {pts[:, g].std(ddof=1) if n > 1 else 0:.4f}"
                              for g, key in enumerate(pb.keys))  # fmt: skip
            print(f"  {label:40s} {cells}")
        for a, b in ((1, 2), (0, 2)):
            d = paired_difference(pb, [(3 * k + a, 3 * k + b) for k in range(n)])
            per = [paired_difference(pb, [(3 * k + a, 3 * k + b)])["mAP"]["delta"] for k in range(n)]
            cells = "  ".join(f"{key} {v['delta']:+.4f} [{v['ci'][0]:+.4f}, {v['ci'][1]:+.4f}] ({v['frac_le_0']:.3f})"
                              for key, v in d.items())  # fmt: skip
            print(f"  Δ {names[b]} − {names[a]}: {cells}; per run mAP {', '.join(f'{x:+.4f}' for x in per)}")


if __name__ == "__main__":
    main()
