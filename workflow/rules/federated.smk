# Federated averaging (layer-wise LMC paper, official LLMC/federated_train.py): one job per run
# (every round), its checkpoints ({run}/checkpoints/, not declared outputs, so a failed job keeps
# them) let a restarted job resume; it writes every client's and the global model's final file
# (client0 and client1 declared, the pairs' endpoints) and its metrics per round.

FEDERATED_RUN = results("{experiment}/federated/{aggregation}/seed{seed}")


rule federated:
    output:
        client0=f"{FEDERATED_RUN}/client0.pt",
        client1=f"{FEDERATED_RUN}/client1.pt",
        global_model=f"{FEDERATED_RUN}/global.pt",
        rounds=f"{FEDERATED_RUN}/rounds.parquet",
    wildcard_constraints:
        aggregation="full|layers|aligned",
    params:
        code=code(*TORCH_JOB, "federated", "layerwise", "interpolation", "repair", "metrics",
                  "barriers", "alignment", "features"),
        run=federated_params,
        base_seed=lambda wildcards: exp(wildcards)["seed"],
    threads: heavy_threads
    resources:
        gpu=gpus,
    log:
        results("logs/{experiment}/federated/{aggregation}/seed{seed}.log"),
    benchmark:
        results("benchmarks/{experiment}/federated/{aggregation}-seed{seed}.tsv")
    conda:
        ENV
    script:
        "../scripts/federated.py"


rule federated_table:
    input:
        tables=federated_files("rounds.parquet"),
    params:
        code=code("logs", "io", "report", "barriers", "summary"),  # the table rule's: torch-free
        sweeps=SWEEP_POINTS,  # the family and sweep columns every table has
    output:
        parquet=results("tables/federated.parquet"),
        html=report(results("tables/federated.html"), caption="../report/table.rst",
                    category="Tables", labels={"table": "federated"}),
    log:
        results("logs/tables/federated.log"),
    benchmark:
        results("benchmarks/tables/federated.tsv")
    conda:
        ENV
    script:
        "../scripts/table.py"
