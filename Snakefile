# LLFC and layer-wise LMC: training -> pairs -> LMC curves -> features -> metrics -> figures.
# No logic here: the config is validated in workflow/rules/common.smk, each stage has its .smk.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/training.smk"
include: "workflow/rules/pairs.smk"
include: "workflow/rules/llfc.smk"
include: "workflow/rules/figures.smk"


rule all:
    input:
        FIGURES,
