# Cross-experiment tables (one long Parquet file per analysis) and the figures drawn from them.

PAIR_TABLES = ["lmc", "llfc", "weak_additivity", "commutativity"]  # concatenated per-pair files
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
}


rule table:
    input:
        tables=lambda wildcards: pair_files(
            f"{wildcards.table}.parquet", layerwise=wildcards.table in LAYERWISE_TABLES
        ),
        code=code(),
    output:
        report(
            "results/tables/{table}.parquet",
            caption="../report/table.rst",
            category="Tables",
        ),
    wildcard_constraints:
        table="|".join(PAIR_TABLES + LAYERWISE_TABLES),
    log:
        "logs/tables/{table}.log",
    benchmark:
        "results/benchmarks/tables/{table}.tsv"
    conda:
        ENV
    script:
        "../scripts/table.py"


rule alignment_table:
    input:
        "results/tables/lmc.parquet",
        code=code("figures", "metrics"),
    output:
        "results/tables/alignment.parquet",
    log:
        "logs/tables/alignment.log",
    benchmark:
        "results/benchmarks/tables/alignment.tsv"
    conda:
        ENV
    script:
        "../scripts/alignment_table.py"


rule figure:
    input:
        lambda wildcards: f"results/tables/{TABLE_OF_FIGURE[wildcards.fig]}.parquet",
        code=code("figures", "metrics"),
    output:
        pdf=report("results/figures/{fig}.pdf", caption="../report/figure.rst", category="Figures"),
        png="results/figures/{fig}.png",
    wildcard_constraints:
        fig="|".join(TABLE_OF_FIGURE),
    log:
        "logs/figures/{fig}.log",
    benchmark:
        "results/benchmarks/figures/{fig}.tsv"
    conda:
        ENV
    script:
        "../scripts/figure.py"
