# Pairs of endpoints and their LMC curves. Spawning and naive pairs take the runs' weights as
# they are; permutation methods (lmcflow.pairs.METHODS with an align step) also write π.

PAIR = "results/{experiment}/pairs/{method}/{pair}"


rule make_pair:
    input:
        unpack(get_make_pair_input),
        code=code("pairs", "matching", "features"),
    output:
        a=f"{PAIR}/model_a.pt",
        b=f"{PAIR}/model_b.pt",
        info=f"{PAIR}/pair.json",
    wildcard_constraints:
        method="|".join(m for m in METHODS if m not in PERMUTATION_METHODS),
    params:
        setting=pair_params,
    log:
        "logs/{experiment}/pairs/{method}/{pair}/make_pair.log",
    benchmark:
        "results/benchmarks/{experiment}/make_pair/{method}-{pair}.tsv"
    conda:
        ENV
    script:
        "../scripts/make_pair.py"


use rule make_pair as align_pair with:
    output:
        a=f"{PAIR}/model_a.pt",
        b=f"{PAIR}/model_b.pt",
        info=f"{PAIR}/pair.json",
        permutation=f"{PAIR}/permutation.json",
    wildcard_constraints:
        method="|".join(PERMUTATION_METHODS),
    threads: heavy_threads
    resources:
        gpu=gpus,
    log:
        "logs/{experiment}/pairs/{method}/{pair}/align_pair.log",
    benchmark:
        "results/benchmarks/{experiment}/align_pair/{method}-{pair}.tsv"


rule lmc:
    input:
        a=f"{PAIR}/model_a.pt",
        b=f"{PAIR}/model_b.pt",
        info=f"{PAIR}/pair.json",
        code=code("interpolation"),
    output:
        f"{PAIR}/lmc.parquet",
    params:
        setting=lmc_params,
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
