"""Everything checked before any job: the schema and the cross-field rules (`config.validate`),
then what needs more than the config's text — the endpoint files an experiment brings
(`pairs.check_endpoint_files`), the pretrained and fine-tuned checkpoints it brings
(`pairs.check_finetune_files`) and the layer groups a federated experiment averages (the model
is built for it: `federated.check_layer_names`). Torch is imported only for the experiments
that need one of those. Raises `config.ConfigError` naming the key."""

from __future__ import annotations

from .config import federated_aggregations, finetune_methods, validate


def check(config: dict) -> dict:
    """Validate ``config`` (defaults filled in place) and check what it points at."""
    validate(config)
    for name, exp in config["experiments"].items():
        if "runs" in exp:  # the user's endpoint files: present, readable, of the configured model
            from .pairs import check_endpoint_files

            check_endpoint_files(name, exp)
        if finetune_methods(exp):  # pretrained and fine-tuned files the user brings, likewise
            from .pairs import check_finetune_files

            check_finetune_files(name, exp)
        if "layers" in federated_aggregations(exp):  # names of the layer groups it averages
            from .federated import check_layer_names

            check_layer_names(name, exp)
    return config
