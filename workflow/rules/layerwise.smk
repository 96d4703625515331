# Layer-wise LMC (Adilova et al. 2024): per pair, single-layer and cumulative barriers,
# per-layer robustness and subspace perturbations; and the deep linear toy (no data).


rule layerwise:
    input:
        unpack(get_layerwise_input),
        code=code("layerwise", "interpolation", "matching", "metrics", "features"),
    output:
        layer_barriers=f"{PAIR}/layer_barriers.parquet",
        cumulative_barriers=f"{PAIR}/cumulative_barriers.parquet",
        layer_robustness=f"{PAIR}/layer_robustness.parquet",
        subspace=f"{PAIR}/subspace.parquet",
    params:
        setting=layerwise_params,
    threads: heavy_threads
    resources:
        gpu=gpus,
    log:
        "logs/{experiment}/pairs/{method}/{pair}/layerwise.log",
    benchmark:
        "results/benchmarks/{experiment}/layerwise/{method}-{pair}.tsv"
    conda:
        ENV
    script:
        "../scripts/layerwise.py"


rule linear_toy:
    input:
        code=code("layerwise", "interpolation", "metrics"),
    output:
        "results/tables/linear_toy.parquet",
    log:
        "logs/tables/linear_toy.log",
    benchmark:
        "results/benchmarks/tables/linear_toy.tsv"
    conda:
        ENV
    script:
        "../scripts/linear_toy.py"
