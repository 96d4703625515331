# LLFC and layer-wise LMC: training -> pairs -> LMC curves -> features -> metrics -> figures.
# No logic here: the config is validated in workflow/rules/common.smk, each stage has its .smk.
from snakemake.utils import min_version

min_version("9.0")


# --configfile FILE replaces the default config instead of merging into it (a paper-scale
# config must not also run the default experiments).
if not config:

    configfile: "config.yaml"



include: "workflow/rules/common.smk"
include: "workflow/rules/training.smk"
include: "workflow/rules/pairs.smk"
include: "workflow/rules/analyses.smk"
include: "workflow/rules/layerwise.smk"
include: "workflow/rules/federated.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/figures.smk"


rule all:
    input:
        FIGURES,
