# LLFC: features of A, B and θ_α on the probe set (Parquet), then per-sample metrics; and the
# mechanisms behind it (weak additivity, commutativity) on the same probe set.


rule features:
    input:
        a=rules.lmc.input.a,
        b=rules.lmc.input.b,
        info=rules.lmc.input.info,
        code=code("features", "interpolation"),
    output:
        f"{PAIR}/features.parquet",
    params:
        setting=probe_params,
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
        code=code("metrics", "features"),
    output:
        f"{PAIR}/llfc.parquet",
    log:
        "logs/{experiment}/pairs/{method}/{pair}/llfc.log",
    benchmark:
        "results/benchmarks/{experiment}/llfc/{method}-{pair}.tsv"
    conda:
        ENV
    script:
        "../scripts/llfc.py"


rule mechanisms:
    input:
        a=rules.lmc.input.a,
        b=rules.lmc.input.b,
        info=rules.lmc.input.info,
        code=code("mechanisms", "metrics", "features"),
    output:
        weak_additivity=f"{PAIR}/weak_additivity.parquet",
        commutativity=f"{PAIR}/commutativity.parquet",
    params:
        setting=probe_params,
    threads: heavy_threads
    resources:
        gpu=gpus,
    log:
        "logs/{experiment}/pairs/{method}/{pair}/mechanisms.log",
    benchmark:
        "results/benchmarks/{experiment}/mechanisms/{method}-{pair}.tsv"
    conda:
        ENV
    script:
        "../scripts/mechanisms.py"
