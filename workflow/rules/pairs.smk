# Pairs of endpoints (spawning, naive; alignment methods plug into lmcflow.pairs) and LMC curves.


rule make_pair:
    input:
        unpack(get_make_pair_input),
    output:
        a="results/{experiment}/pairs/{method}/{pair}/model_a.pt",
        b="results/{experiment}/pairs/{method}/{pair}/model_b.pt",
        info="results/{experiment}/pairs/{method}/{pair}/pair.json",
    params:
        setting=eval_params,
    log:
        "logs/{experiment}/pairs/{method}/{pair}/make_pair.log",
    benchmark:
        "results/benchmarks/{experiment}/make_pair/{method}-{pair}.tsv"
    conda:
        ENV
    script:
        "../scripts/make_pair.py"


rule lmc:
    input:
        a=rules.make_pair.output.a,
        b=rules.make_pair.output.b,
        info=rules.make_pair.output.info,
    output:
        "results/{experiment}/pairs/{method}/{pair}/lmc.parquet",
    params:
        setting=eval_params,
    threads: heavy_threads
    resources:
        gpu=gpus,
    log:
        "logs/{experiment}/pairs/{method}/{pair}/lmc.log",
    benchmark:
        "results/benchmarks/{experiment}/lmc/{method}-{pair}.tsv"
    conda:
        ENV
    script:
        "../scripts/lmc.py"
