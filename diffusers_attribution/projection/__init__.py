"""Projectors: per-sample gradients → k-dimensional features φ(z) = g(z) P (one file per projector).

    base.py        Projector: the protocol (dim, spec, features; fit / state_dict for projectors fitted on data)
    dense.py       identity (exact), gaussian / rademacher (dense, generated blockwise)
    factored.py    factored: per-layer P_outᵀ G P_in from hooks (the fast path)
    calibrated.py  factored with per-layer eigenbases measured on training examples (the default for TRAK/D-TRAK)
    registry.py    name → factory; `make_projector(config, denoiser, parameters)`

Nothing is imported here, so that `import diffusers_attribution.projection.registry` stays light.
"""
