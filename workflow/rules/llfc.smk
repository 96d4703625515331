# LLFC: features of A, B and θ_α on the probe set (Parquet), then per-sample metrics.


rule features:
    input:
        a=rules.make_pair.output.a,
        b=rules.make_pair.output.b,
        info=rules.make_pair.output.info,
    output:
        "results/{experiment}/pairs/{method}/{pair}/features.parquet",
    params:
        setting=eval_params,
    threads: heavy_threads
    resources:
        gpu=gpus,
    log:
        "logs/{experiment}/pairs/{method}/{pair}/features.log",
    benchmark:
        "results/benchmarks/{experiment}/features/{method}-{pair}.tsv"
    conda:
        ENV
    script:
        "../scripts/features.py"


rule llfc:
    input:
        rules.features.output[0],
    output:
        "results/{experiment}/pairs/{method}/{pair}/llfc.parquet",
    log:
        "logs/{experiment}/pairs/{method}/{pair}/llfc.log",
    benchmark:
        "results/benchmarks/{experiment}/llfc/{method}-{pair}.tsv"
    conda:
        ENV
    script:
        "../scripts/llfc.py"
