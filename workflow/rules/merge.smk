# Merging many models (Git Re-Basin's MergeMany; lmcflow.merging): per experiment with merge.k,
# its independent runs seed{S}..seed{S + max(k) - 1} merged K at a time by every merge method,
# the K-way average evaluated under every policy of lmc.policies; one table, fig19.


rule merge_many:
    input:
        runs=get_merge_many_input,
    output:
        results("{experiment}/merge/merge.parquet"),
    params:
        code=code(*TORCH_JOB, "merging", "alignment", "finetune", "finetune_plan", "features",
                  "metrics", "interpolation", "repair"),
        setting=merge_many_params,
    threads: heavy_threads
    resources:
        gpu=gpus,
    log:
        results("logs/{experiment}/merge/merge_many.log"),
    benchmark:
        results("benchmarks/{experiment}/merge_many.tsv")
    conda:
        ENV
    script:
        "../scripts/merge_many.py"


use rule federated_table as merge_table with:
    input:
        tables=[results(f"{name}/merge/merge.parquet") for name in MERGE_EXPERIMENTS],
    output:
        parquet=results("tables/merge.parquet"),
        html=report(results("tables/merge.html"), caption="../report/table.rst",
                    category="Tables", labels={"table": "merge"}),
    log:
        results("logs/tables/merge.log"),
    benchmark:
        results("benchmarks/tables/merge.tsv")
