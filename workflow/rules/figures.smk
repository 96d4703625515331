# Cross-experiment tables (one long Parquet file per analysis) and the figures drawn from them.

PAIR_TABLES = ["lmc", "llfc", "weak_additivity", "commutativity", "stitching"]  # per-pair files
LAYERWISE_TABLES = ["layer_barriers", "cumulative_barriers", "layer_robustness", "subspace"]
TABLE_OF_FIGURE = {
    "fig1": "lmc",
    "fig2": "alignment",
    "fig3": "llfc",
    "fig4": "llfc",
    "fig5": "weak_additivity",
    "fig6": "commutativity",
    "fig7": "layer_barriers",
    "fig8": "cumulative_barriers",
    "fig9": "layer_robustness",
    "fig10": "subspace",
    "fig11": "linear_toy",
    "fig12": "stitching",
    "fig13": "pair_summary",
    "fig14": "pair_summary",
    "fig15": "federated",
    "fig16": "ctl",
    "fig17": "task_arithmetic",
    "fig18": "averaging",
    "fig19": "merge",
}


TABLE_CODE = code("logs", "io", "report", "barriers", "summary")  # torch-free


rule table:
    input:
        tables=lambda wildcards: pair_files(
            f"{wildcards.table}.parquet", layerwise=wildcards.table in LAYERWISE_TABLES
        ),
    params:
        code=TABLE_CODE,
        sweeps=SWEEP_POINTS,
    output:
        parquet=results("tables/{table}.parquet"),
        html=report(results("tables/{table}.html"), caption="../report/table.rst", category="Tables",
                    labels={"table": "{table}"}),
    wildcard_constraints:
        table="|".join(t for t in PAIR_TABLES + LAYERWISE_TABLES if t != "lmc"),
    log:
        results("logs/tables/{table}.log"),
    benchmark:
        results("benchmarks/tables/{table}.tsv")
    conda:
        ENV
    script:
        "../scripts/table.py"


use rule table as lmc_table with:
    input:
        tables=pair_files("lmc.parquet"),
    params:
        code=TABLE_CODE,
        sweeps=SWEEP_POINTS,
    output:
        parquet=results("tables/lmc.parquet"),
        html=report(results("tables/lmc.html"), caption="../report/table.rst", category="Tables",
                    labels={"table": "lmc"}),
        alignment=results("tables/alignment.parquet"),
        alignment_html=report(results("tables/alignment.html"), caption="../report/table.rst",
                              category="Tables", labels={"table": "alignment"}),
    log:
        results("logs/tables/lmc.log"),
    benchmark:
        results("benchmarks/tables/lmc.tsv")


rule pair_summary:
    input:
        **{t: results(f"tables/{t}.parquet") for t in ("lmc", "llfc", "commutativity")},
    params:
        code=TABLE_CODE,
    output:
        parquet=results("tables/pair_summary.parquet"),
        html=report(results("tables/pair_summary.html"), caption="../report/table.rst",
                    category="Tables", labels={"table": "pair_summary"}),
    log:
        results("logs/tables/pair_summary.log"),
    benchmark:
        results("benchmarks/tables/pair_summary.tsv")
    conda:
        ENV
    script:
        "../scripts/pair_summary.py"


rule figure:
    input:
        lambda wildcards: results(f"tables/{TABLE_OF_FIGURE[wildcards.fig]}.parquet"),
    params:
        code=code("logs", "io", "figures", "barriers", "summary"),
    output:
        pdf=report(results("figures/{fig}.pdf"), caption="../report/figure.rst", category="Figures",
                   labels={"figure": "{fig}", "file": "PDF"}),
        png=report(results("figures/{fig}.png"), caption="../report/figure.rst", category="Figures",
                   labels={"figure": "{fig}", "file": "PNG"}),
    wildcard_constraints:
        fig="|".join(TABLE_OF_FIGURE),
    log:
        results("logs/figures/{fig}.log"),
    benchmark:
        results("benchmarks/figures/{fig}.tsv")
    conda:
        ENV
    script:
        "../scripts/figure.py"
