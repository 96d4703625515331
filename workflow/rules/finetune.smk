# Pretraining and fine-tuning (lmcflow.finetune, lmcflow.tasks): θ_0, the fine-tunings of every
# task from θ_0 (start `pretrained`) and from θ_0's random initialisation (start `random`, the
# control); per cross-task pair the CTL and task-arithmetic analyses; per experiment and start
# the weight average of K fine-tuned models against the ensemble of their logits.

FINETUNE_RUN = results("{experiment}/runs/finetune/{start}/{task}/run{run}")


wildcard_constraints:
    start="pretrained|random",
    task=r"[A-Za-z0-9_]+",
    run=r"\d+",


use rule train as pretrain with:
    output:
        results("{experiment}/runs/pretrain/final.pt"),
    params:
        code=code(*TORCH_JOB),
        run=pretrain_params,
    log:
        results("logs/{experiment}/runs/pretrain.log"),
    benchmark:
        results("benchmarks/{experiment}/train/pretrain.tsv")


rule finetune:
    input:
        unpack(get_finetune_input),
    output:
        f"{FINETUNE_RUN}/final.pt",
    params:
        code=code(*TORCH_JOB),
        run=finetune_params,
    threads: heavy_threads
    resources:
        gpu=gpus,
    log:
        results("logs/{experiment}/runs/finetune/{start}/{task}/run{run}.log"),
    benchmark:
        results("benchmarks/{experiment}/finetune/{start}-{task}-run{run}.tsv")
    conda:
        ENV
    script:
        "../scripts/finetune.py"


rule finetune_pair:
    input:
        unpack(get_finetune_pair_input),
    output:
        ctl=f"{PAIR}/ctl.parquet",
        task_arithmetic=f"{PAIR}/task_arithmetic.parquet",
    wildcard_constraints:
        method="finetune_cross_task|finetune_cross_task_random",
    params:
        code=code(*TORCH_JOB, "finetune", "finetune_plan", "features", "metrics", "barriers", "interpolation",
                  "repair"),
        setting=finetune_pair_params,
    threads: heavy_threads
    resources:
        gpu=gpus,
    log:
        results("logs/{experiment}/pairs/{method}/{pair}/finetune_pair.log"),
    benchmark:
        results("benchmarks/{experiment}/finetune_pair/{method}-{pair}.tsv")
    conda:
        ENV
    script:
        "../scripts/finetune_pair.py"


rule model_averaging:
    input:
        unpack(get_averaging_input),
    output:
        results("{experiment}/finetune/averaging_{start}.parquet"),
    params:
        code=code(*TORCH_JOB, "finetune", "finetune_plan", "features", "metrics", "barriers", "interpolation",
                  "repair"),
        setting=averaging_params,
    threads: heavy_threads
    resources:
        gpu=gpus,
    log:
        results("logs/{experiment}/finetune/averaging_{start}.log"),
    benchmark:
        results("benchmarks/{experiment}/model_averaging/{start}.tsv")
    conda:
        ENV
    script:
        "../scripts/model_averaging.py"


use rule federated_table as finetune_table with:
    input:
        tables=lambda wildcards: finetune_tables(wildcards.table),
    output:
        parquet=results("tables/{table}.parquet"),
        html=report(results("tables/{table}.html"), caption="../report/table.rst",
                    category="Tables", labels={"table": "{table}"}),
    wildcard_constraints:
        table="ctl|task_arithmetic|averaging",
    log:
        results("logs/tables/{table}.log"),
    benchmark:
        results("benchmarks/tables/{table}.tsv")
