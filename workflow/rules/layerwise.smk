# Layer-wise LMC (Adilova et al. 2024): per pair, single-layer and cumulative barriers,
# per-layer robustness and subspace perturbations; and the deep linear toy (no data).


rule layerwise:
    input:
        unpack(get_layerwise_input),
    output:
        layer_barriers=f"{PAIR}/layer_barriers.parquet",
        cumulative_barriers=f"{PAIR}/cumulative_barriers.parquet",
        layer_robustness=f"{PAIR}/layer_robustness.parquet",
        subspace=f"{PAIR}/subspace.parquet",
    params:
        code=code(*TORCH_JOB, "layerwise", "interpolation", "repair", "alignment",
                  "metrics", "barriers", "features"),
        setting=layerwise_params,
    threads: heavy_threads
    resources:
        gpu=gpus,
    log:
        results("logs/{experiment}/pairs/{method}/{pair}/layerwise.log"),
    benchmark:
        results("benchmarks/{experiment}/layerwise/{method}-{pair}.tsv")
    conda:
        ENV
    script:
        "../scripts/layerwise.py"


rule linear_toy:
    params:
        code=code("logs", "io", "toy", "report", "summary", "barriers"),
    output:
        parquet=results("tables/linear_toy.parquet"),
        html=report(results("tables/linear_toy.html"), caption="../report/table.rst",
                    category="Tables", labels={"table": "linear_toy"}),
    log:
        results("logs/tables/linear_toy.log"),
    benchmark:
        results("benchmarks/tables/linear_toy.tsv")
    conda:
        ENV
    script:
        "../scripts/linear_toy.py"
