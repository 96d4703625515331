# Cross-experiment tables (one long Parquet file per analysis) and the figures drawn from them.

TABLE_OF_FIGURE = {"fig1": "lmc", "fig3": "llfc"}


rule table:
    input:
        lambda wildcards: pair_files(f"{wildcards.table}.parquet"),
    output:
        "results/tables/{table}.parquet",
    wildcard_constraints:
        table="|".join(set(TABLE_OF_FIGURE.values())),
    log:
        "logs/tables/{table}.log",
    benchmark:
        "results/benchmarks/tables/{table}.tsv"
    conda:
        ENV
    script:
        "../scripts/table.py"


rule figure:
    input:
        lambda wildcards: f"results/tables/{TABLE_OF_FIGURE[wildcards.fig]}.parquet",
    output:
        pdf="results/figures/{fig}.pdf",
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
