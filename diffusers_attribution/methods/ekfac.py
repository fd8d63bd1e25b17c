"""EK-FAC influence (Mlodozeniec et al., "Influence Functions for Scalable Data Attribution in Diffusion Models",
ICLR 2025), with stored training features and query-side preconditioning (curvature.py for the math):

    τ(z, q) = Σ_coordinates H(q) H(z) / (Λ + λ)  ≈  φ̃(q) · φ(z),
    φ(z) = (H(z) ⊘ sqrt(Λ + λ_f)) M,   φ̃(q) = (H(q) ⊙ sqrt(Λ + λ_f) ⊘ (Λ + λ)) M

with H the gradient in the per-layer EK-FAC eigenbases (Q_S, Q_A of the K-FAC-expand factors), Λ the corrected
eigenvalues measured over (example, timestep, noise) pairs, M the calibrated projector's seeded mix (a signed
partition), and λ = damping_ratio · mean(Λ) (or `config.damping`), never chosen on queries; λ_f is the λ the
store was featurized with (both sides whitened before the mix; stores written before version 2 of the
eigenvalue correction keep φ(z) = H(z) M, φ̃(q) = (H(q) ⊘ (Λ + λ)) M). `ekfac` uses the MC Fisher (GGN, the
paper's default), `ekfac-empirical` the empirical Fisher.

Declared parts: the projector is the EK-FAC one (fitted on data: its bases travel as the projection's state, Λ as
what the method fitted, the store's method state); queries are preconditioned (`queries`); the scorer is the dot
product.
"""

from __future__ import annotations

from .base import Method, PerPair, register_method


class _EKFACMethod(Method):
    """damping_ratio: the grid ratio with the best mean validation LDS on the digits benchmark over 3 seeds
    (`benchmarks/lds_digits.py --choose-ekfac`, docs/methods.md): 1e-4 (MC), 1.8e-4 (empirical); it was 0.1 and 0.32
    before the features were whitened (version 2). query_samples (MC Fisher): 3 per training pair (S = 30 at K = 10),
    the training pairs first (`benchmarks/query_samples.py`'s rule on the digits benchmark); with parameters="lora"
    the training pairs alone (the LoRA benchmark's rule)."""

    default_output = "loss"
    defaults = {"num_timesteps": 10, "damping_ratio": 0.0001, "query_samples": PerPair(3)}
    lora_defaults = {"damping_ratio": 0.56, "query_samples": None}  # the LoRA benchmark's rule (docs/benchmarks.md)
    calibrated = True
    fisher = "mc"
    # the features are whitened by sqrt(Λ + λ_f), λ_f the config's λ, and the kept coordinates ranked after it
    feature_fields = ("damping", "damping_ratio")

    def check_config(self, config) -> None:
        if config.projector != "factored" or not config.calibration_examples:
            raise ValueError(f"method={config.method!r} measures its curvature like the calibrated factored "
                             f"projection: it needs projector='factored' and calibration_examples > 0 (got "
                             f"{config.projector!r}, {config.calibration_examples})")

    def projector(self, config, denoiser, parameters):
        from ..curvature import PreconditionedProjector

        return PreconditionedProjector(denoiser, parameters, config.projection_dim, config.projection_seed,
                                       sketch_dim=config.sketch_dim, examples=config.calibration_examples,
                                       fisher=self.fisher, damping_ratio=config.damping_ratio,
                                       feature_damping=config.damping)

    def fit_state(self, featurizer) -> dict:
        """Λ, fitted with the bases (the store's method state)."""
        return featurizer.projector.curvature_state()

    def load_fit_state(self, featurizer, state: dict) -> None:
        featurizer.projector.load_curvature(state)

    @staticmethod
    def damping(featurizer, damping: float | None = None, damping_ratio: float | None = None) -> float:
        """λ: `damping`, else `config.damping`, else ratio · mean(Λ) (ratio: the argument or `config.damping_ratio`):
        the one damping rule (scoring.resolve_damping) with mean(Λ) as the mean eigenvalue."""
        from ..scoring import resolve_damping

        config = featurizer.config
        ratio = config.damping_ratio if damping_ratio is None else damping_ratio
        return resolve_damping(config.damping if damping is None else damping, ratio,
                               featurizer.projector.mean_eigenvalue, 1, 1)

    def query_sketch(self, featurizer, images, prompts=None):
        """H(q) [n, k_mid]: the queries' rotated coordinates before preconditioning and mix (any λ from one pass)."""
        return featurizer.projected_queries(images, prompts, projector=featurizer.projector.sketch)

    def queries(self, featurizer, images, prompts=None, *, damping: float | None = None,
                damping_ratio: float | None = None):
        """φ̃(q) = (H(q) ⊘ (Λ + λ)) M [n, k]: preconditioned before the mix, so scores are plain dot products."""
        return featurizer.projector.precondition(self.query_sketch(featurizer, images, prompts),
                                                 self.damping(featurizer, damping, damping_ratio))

    def scorer(self, store, damping=None, damping_ratio=None):
        """τ = Φ̃_q Φᵀ: the queries carry 1/(Λ + λ) with the store config's λ (`queries`), so another λ here would
        be silently ignored: it is an error instead."""
        from ..curvature import MEAN_EIGENVALUE
        from ..scoring import DotScorer, resolve_damping

        state = store.method_state or {}
        if MEAN_EIGENVALUE not in state:
            raise ValueError(f"the store of method {store.config.method!r} holds no EK-FAC curvature (method_state)")
        mean = float(state[MEAN_EIGENVALUE][0])
        config = store.config

        def resolve(value, ratio):  # the one damping rule, with mean(Λ) as the mean eigenvalue
            return resolve_damping(value, ratio, mean, 1, 1)

        stored = resolve(config.damping, config.damping_ratio)
        asked = resolve(damping if damping is not None else (config.damping if damping_ratio is None else None),
                        config.damping_ratio if damping_ratio is None else damping_ratio)
        if abs(asked - stored) > 1e-9 * max(abs(stored), 1e-30):
            raise ValueError(f"EK-FAC preconditions the queries with λ = {stored:.4g} (the store's config); for "
                             f"λ = {asked:.4g} featurize them with featurize_queries(images, damping={asked:.4g}) "
                             "and score with this scorer")
        return DotScorer(store, metadata={"damping": stored})


@register_method
class EKFAC(_EKFACMethod):
    name = "ekfac"
    aliases = ("ek-fac",)
    default_for = ("lora",)  # issue 24's choice on the LoRA benchmark, kept on its two-seed ground truth (docs/benchmarks.md)
    title = "EK-FAC influence, MC Fisher (Mlodozeniec et al., ICLR 2025)"


@register_method
class EKFACEmpirical(_EKFACMethod):
    name = "ekfac-empirical"
    title = "EK-FAC influence, empirical Fisher (after Mlodozeniec et al., ICLR 2025)"
    # query_samples: the training pairs; the rule keeps them on the digits benchmark (3·K·D is within one std)
    defaults = {"num_timesteps": 10, "damping_ratio": 0.00018, "query_samples": None}
    lora_defaults = {"damping_ratio": 0.32, "query_samples": None}  # the LoRA benchmark's rule (docs/benchmarks.md)
    fisher = "empirical"
