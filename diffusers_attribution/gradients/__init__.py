"""Gradients of a per-sample output (nothing is imported with the package):

    task.py        AttributionTask: F_i(θ) = (1/(K·D)) Σ f(z_i, t, ε); timesteps, noise, parameter selection
    hooks.py       attribution hooks (diffusers' HookRegistry): layer inputs and output gradients of one backward
    reference.py   per-example gradients by plain autograd, the reference every fast path is tested against
    timesteps.py   per-(example, timestep, noise) features (TracIn, ReTrac, Journey-TRAK, the bias diagnostics)
"""
