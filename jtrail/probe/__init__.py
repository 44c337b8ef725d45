"""Probe training: collect a model's hidden states and answer lengths (`data`), train the length-probe
head per layer (`train`), evaluate it as the engine uses it (`eval`), check inputs and results
(`checks`), and run it end to end on the model's own answers (`pipeline`) or on recorded answers
(`replay`); `cli` is `jtrail train-probe`. Submodules load JAX; import them, not this package, for work.
"""
