"""How much the default run's numbers vary: run a config at several base seeds, print its
summary tables with mean ± sd over all pairs (the README's "What the default run shows").

    python benchmarks/variability.py [--config config.yaml] [--seeds 0 1 2] [--cores 2] [--keep DIR]

Each seed s runs the config with every experiment's `seed` set to 1000·s (so no run is
shared) in its own directory, up to the tables (no figures). A run on another machine differs
from this one like another seed does: float rounding differs, and training amplifies it.
Prints per experiment and method: the test-error and test-loss barriers (of the curve with BN
statistics reset where the model has BatchNorm), the LLFC ratio (1 − cos_α)/(1 − cos_AB) at
α = ½ over the hidden layers, and the mean Dist_com over the hidden Linear/Conv layers.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))

from lmcflow.metrics import barriers  # noqa: E402

TABLES = ["lmc", "llfc", "commutativity", "stitching"]


def run_seed(config: dict, seed: int, workdir: Path, cores: str) -> Path:
    config = yaml.safe_load(yaml.safe_dump(config))
    for exp in config["experiments"].values():
        exp["seed"] = 1000 * seed
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    root = config.get("results", "results")
    targets = [f"{root}/tables/{t}.parquet" for t in TABLES]  # relative to the run directory
    subprocess.run([str(Path(sys.executable).parent / "snakemake"), "--snakefile",
                    str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", cores,
                    "--quiet=all", *targets], check=True)
    return workdir / root / "tables"


def hidden(layers: pd.Series) -> pd.Series:
    """Every layer but the first Linear/Conv (linear in the weights: 1 − cos_α = 0 there) and the
    logits."""
    first = {"fc1", "features.conv1", "stem", "stem.conv", "conv1"}
    return ~layers.isin(first) & ~layers.isin({"out", "fc"})


def per_pair(tables: Path, seed: int) -> pd.DataFrame:
    lmc = pd.read_parquet(tables / "lmc.parquet")
    lmc = lmc[(lmc.split == "test") & lmc.bn.isin(["reset", "none"])]
    bar = barriers(lmc.drop(columns="bn"))
    bar["error_barrier"] *= 100
    llfc = pd.read_parquet(tables / "llfc.parquet")
    llfc = llfc[(llfc.alpha == 0.5) & hidden(llfc.layer)]
    means = llfc.groupby(["experiment", "method", "pair", "layer"])[
        ["one_minus_cos_alpha", "one_minus_cos_ab"]].mean()
    ratio = (means.one_minus_cos_alpha / means.one_minus_cos_ab).groupby(
        ["experiment", "method", "pair"]).agg(ratio_min="min", ratio_max="max", ratio_mean="mean")
    com = pd.read_parquet(tables / "commutativity.parquet")
    com = com[hidden(com.layer)].groupby(["experiment", "method", "pair"])["dist_com"].mean()
    # REPAIR: the midpoint's test loss with REPAIR beside the configured curve's
    lmc = pd.read_parquet(tables / "lmc.parquet")
    mid = lmc[(lmc.split == "test") & (lmc.alpha == 0.5)]
    mid = mid.assign(curve=mid["configured"].map({True: "mid_loss", False: "mid_loss_other"}))
    mid = mid[mid.configured | (mid.bn == "repair")].pivot_table(
        index=["experiment", "method", "pair"], columns="curve", values="loss")
    mid = mid.rename(columns={"mid_loss_other": "mid_loss_repair"})
    # stitching: the largest error increase (pp) over stitch points and directions
    st = pd.read_parquet(tables / "stitching.parquet")
    keys = ["experiment", "method", "pair", "into"]
    own = st[st.layer == "(none)"].set_index(keys)["error"]
    st = st[st.layer != "(none)"].join(own.rename("own"), on=keys)
    stitch = (100 * (st["error"] - st["own"])).groupby([st.experiment, st.method, st.pair]).max()
    out = bar.set_index(["experiment", "method", "pair"])[["error_barrier", "loss_barrier"]]
    return (out.join(ratio).join(com).join(mid).join(stitch.rename("stitch_pp"))
            .reset_index().assign(seed=seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "config.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cores", default="2")
    parser.add_argument("--keep", help="run in this directory and keep it (default: a temp dir)")
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    base = Path(args.keep or tempfile.mkdtemp(prefix="lmcflow-seeds-"))
    pairs = pd.concat([per_pair(run_seed(config, s, base / f"seed{s}", args.cores), s)
                       for s in args.seeds], ignore_index=True)
    pd.set_option("display.width", 160)
    print(pairs.to_string(index=False, float_format="%.3f"))
    cols = ["error_barrier", "loss_barrier", "ratio_mean", "dist_com", "mid_loss",
            "mid_loss_repair", "stitch_pp"]
    summary = pairs.groupby(["experiment", "method"])[cols].agg(["mean", "std", "min", "max"])
    print(f"\nover {len(args.seeds)} seeds x pairs per seed (error barrier in pp, test split; "
          "ratio = (1 - cos_a)/(1 - cos_AB) at a = 1/2, mean over hidden layers):")
    pd.set_option("display.max_columns", None)
    print(summary.T.to_string(float_format="%.3f"))
    print(f"\nruns in {base}")


if __name__ == "__main__":
    main()
