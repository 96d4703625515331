# Every analysis of a pair's interpolation path but the layer-wise ones, one job per pair: the
# LMC curves under each normalisation policy, LLFC on the probe set (features of A, B and θ_α
# to Parquet, read back into per-sample metrics) and the LLFC paper's analyses of the
# endpoints (weak additivity and commutativity on the probe set, stitching on the test split).


rule analyse_pair:
    input:
        a=f"{PAIR}/model_a.pt",
        b=f"{PAIR}/model_b.pt",
        info=f"{PAIR}/pair.json",
    output:
        lmc=f"{PAIR}/lmc.parquet",
        features=f"{PAIR}/features.parquet",
        llfc=f"{PAIR}/llfc.parquet",
        weak_additivity=f"{PAIR}/weak_additivity.parquet",
        commutativity=f"{PAIR}/commutativity.parquet",
        stitching=f"{PAIR}/stitching.parquet",
    params:
        code=code(*TORCH_JOB, "interpolation", "repair", "features", "metrics", "barriers",
                  "mechanisms", "stitching"),
        setting=analysis_params,
    threads: heavy_threads
    resources:
        gpu=gpus,
    log:
        results("logs/{experiment}/pairs/{method}/{pair}/analyse_pair.log"),
    benchmark:
        results("benchmarks/{experiment}/analyse_pair/{method}-{pair}.tsv")
    conda:
        ENV
    script:
        "../scripts/analyse_pair.py"
