"""lmcflow: linear mode connectivity, LLFC and layer-wise LMC as a Snakemake workflow.

One module per concept of the papers: ``data``, ``models``, ``training``, ``pairs``,
``interpolation``, ``features``, ``metrics``, ``figures`` (plus ``config`` and ``io``).
"""
