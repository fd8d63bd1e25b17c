"""Why DAS's unit normalization collapses on the LoRA benchmark but not on the digits (docs/methods.md, "DAS-Fisher").

For 64 training examples of each benchmark's attributed model, ‖P ∇θ mean(ε_θ(x_t, t, c))‖ at the K = 10 timesteps
of the features (`evaluation.timestep_gradient_norms`, DAS's output, a seeded gaussian projection to k = 1024):
the median over examples at each t (the profile over t), and the spread across examples (std / mean) at each t and
of an example's mean over t. Dividing each pair by its norm (DAS) removes that spread.

    python benchmarks/gradient_norms.py          # ~1 min on 2 CPU cores; uses the LDS benchmarks' cached models
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lds_digits  # noqa: E402
import lds_lora  # noqa: E402

from diffusers_attribution import AttributionConfig  # noqa: E402
from diffusers_attribution.evaluation.bias import timestep_gradient_norms  # noqa: E402

EXAMPLES = 64


def report(name: str, pipe, data, parameters) -> None:
    config = AttributionConfig(method="das-fisher", parameters=parameters, projector="gaussian", projection_dim=1024,
                               batch_size=32)
    profile = timestep_gradient_norms(pipe, data, config, timesteps=10, progress=False)
    norms = profile.norms[:, :, 0].double()  # [examples, t]
    median = norms.median(0).values
    spread = norms.std(0) / norms.mean(0)
    per_example = norms.mean(1)
    print(f"{name}: t = {profile.timesteps.tolist()}")
    print("  median norm per t:      " + " ".join(f"{v:.3g}" for v in median.tolist())
          + f"   (max / min {float(median.max() / median.min()):.2f})")
    print("  std / mean across examples, per t: " + " ".join(f"{v:.3f}" for v in spread.tolist()))
    print(f"  an example's mean over t: std / mean {float(per_example.std() / per_example.mean()):.3f}")


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    digits = lds_digits.enable_attribution(lds_digits.full_model(lds_digits.default_workdir()))
    report("digits UNet, every parameter", digits, lds_digits.training_images()[:EXAMPLES], "all")
    lora = lds_lora.enable_attribution(lds_lora.full_model())
    report("LoRA fine-tune, the LoRA weights", lora, lds_lora.training_set()[:EXAMPLES], "lora")


if __name__ == "__main__":
    main()
