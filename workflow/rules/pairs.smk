# Pairs of endpoints. Spawning and naive pairs take the runs' weights as
# they are; permutation methods (lmcflow.pairs.METHODS with an align step) also write π.

PAIR = results("{experiment}/pairs/{method}/{pair}")


rule make_pair:
    input:
        unpack(get_make_pair_input),
    output:
        a=f"{PAIR}/model_a.pt",
        b=f"{PAIR}/model_b.pt",
        info=f"{PAIR}/pair.json",
    wildcard_constraints:
        method="|".join(m for m in METHODS if m not in PERMUTATION_METHODS),
    params:
        code=code(*TORCH_JOB, "pairs", "finetune_plan", "alignment", "features"),
        setting=pair_params,
    log:
        results("logs/{experiment}/pairs/{method}/{pair}/make_pair.log"),
    benchmark:
        results("benchmarks/{experiment}/make_pair/{method}-{pair}.tsv")
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
        results("logs/{experiment}/pairs/{method}/{pair}/align_pair.log"),
    benchmark:
        results("benchmarks/{experiment}/align_pair/{method}-{pair}.tsv")
