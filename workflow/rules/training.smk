# Training runs. A run's checkpoints ({root}/{experiment}/runs/{run}/checkpoints/, not declared
# outputs, so a failed job keeps them) let a restarted job resume where it stopped.


rule train:
    output:
        results("{experiment}/runs/seed{seed}/final.pt"),
    params:
        code=code(*TORCH_JOB),
        run=run_params("independent"),
    threads: heavy_threads
    resources:
        gpu=gpus,
    log:
        results("logs/{experiment}/runs/seed{seed}.log"),
    benchmark:
        results("benchmarks/{experiment}/train/seed{seed}.tsv")
    conda:
        ENV
    script:
        "../scripts/train.py"


use rule train as train_parent with:
    output:
        results("{experiment}/runs/spawn{seed}/parent/final.pt"),
    params:
        code=code(*TORCH_JOB),
        run=run_params("parent"),
    log:
        results("logs/{experiment}/runs/spawn{seed}/parent.log"),
    benchmark:
        results("benchmarks/{experiment}/train/spawn{seed}-parent.tsv")


use rule train as train_child with:
    input:
        parent=results("{experiment}/runs/spawn{seed}/parent/final.pt"),
    output:
        results("{experiment}/runs/spawn{seed}/child{child}/final.pt"),
    params:
        code=code(*TORCH_JOB),
        run=run_params("child"),
    log:
        results("logs/{experiment}/runs/spawn{seed}/child{child}.log"),
    benchmark:
        results("benchmarks/{experiment}/train/spawn{seed}-child{child}.tsv")
