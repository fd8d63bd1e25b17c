"""Audit a Stable Diffusion LoRA fine-tune: which fine-tuning images does a generated image come from?
Attributes through the LoRA weights only (`parameters="lora"`), the way the fine-tune changed the model.

    python examples/lora_audit.py                                        # tiny offline SD + a 30-step LoRA fine-tune
    python examples/lora_audit.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --lora path/or/repo/of/your/lora --dataset your/finetuning-dataset --prompt "a photo of sks dog" --device cuda

Default: a tiny Stable Diffusion pipeline built from configs (examples/tiny_models.py) is fine-tuned with a
LoRA for a few steps on a toy captioned dataset, the LoRA is saved with `save_lora_weights` and loaded into a
fresh pipeline with `load_lora_weights(..., adapter_name="style")`, as you would load your own. With `--lora`
the fine-tuning step is skipped and your LoRA is audited against `--dataset` (its image and text columns).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusers_attribution import AttributionConfig, enable_attribution
from tiny_models import load_training_set, shapes_dataset, tiny_text_to_image_pipeline

ADAPTER = "style"


def finetune_lora(pipe, dataset, directory: Path, steps: int, rank: int = 4, learning_rate: float = 1e-3) -> Path:
    """A minimal LoRA fine-tune of the UNet on (image, caption) pairs, saved with `save_lora_weights`."""
    from diffusers.image_processor import VaeImageProcessor
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet, scheduler = pipe.unet, pipe.scheduler
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=ADAPTER)
    trainable = [p for name, p in unet.named_parameters() if "lora" in name]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate)
    processor = VaeImageProcessor()
    images = torch.cat([processor.preprocess(image.convert("RGB")) for image in dataset["image"]])
    captions = list(dataset["text"])
    generator = torch.Generator().manual_seed(0)
    unet.train()
    for step in range(steps):
        batch = torch.randint(0, len(images), (min(8, len(images)),), generator=generator)
        with torch.no_grad():
            latents = pipe.vae.encode(images[batch]).latent_dist.sample(generator) * pipe.vae.config.scaling_factor
            text, _ = pipe.encode_prompt([captions[i] for i in batch], "cpu", 1, False)
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),), generator=generator)
        loss = F.mse_loss(unet(scheduler.add_noise(latents, noise, t), t, text).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            print(f"  LoRA fine-tune step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    unet.eval()
    type(pipe).save_lora_weights(directory, unet_lora_layers=get_peft_model_state_dict(unet, adapter_name=ADAPTER))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Stable Diffusion pipeline (default: tiny, offline)")
    parser.add_argument("--lora", help="your LoRA weights (directory or Hub id); default: fine-tune one here")
    parser.add_argument("--dataset", help="the fine-tuning set: a Hub dataset or save_to_disk dir with image/text")
    parser.add_argument("--prompt", default="a red circle")
    parser.add_argument("--steps", type=int, default=30, help="LoRA fine-tuning steps (without --lora)")
    parser.add_argument("--num-timesteps", type=int, default=10)
    parser.add_argument("--projection-dim", type=int, default=512)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--output-dir", default="outputs/lora_audit")
    args = parser.parse_args()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)

    def base_pipeline():
        if args.model is None:
            return tiny_text_to_image_pipeline(seed=0)
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(args.model)

    if args.dataset:
        dataset = load_training_set(args.dataset)
    else:
        dataset = shapes_dataset(24)
    lora = args.lora
    if lora is None:
        print(f"fine-tuning a LoRA for {args.steps} steps on {len(dataset)} captioned images", flush=True)
        lora = str(finetune_lora(base_pipeline(), dataset, output / "lora", args.steps))

    print(f"loading the base pipeline and the LoRA {lora} as adapter {ADAPTER!r}", flush=True)
    pipe = base_pipeline()
    pipe.load_lora_weights(lora, adapter_name=ADAPTER)
    if args.device:
        pipe.to(args.device)
    pipe = enable_attribution(pipe)
    pipe.set_progress_bar_config(disable=True)

    config = AttributionConfig(method="d-trak", parameters="lora", adapter_name=ADAPTER,
                               num_timesteps=args.num_timesteps, projection_dim=args.projection_dim)
    print(f"featurizing the {len(dataset)} fine-tuning images through the LoRA weights only", flush=True)
    store = pipe.featurize(dataset, config, output_dir=output / "store", dataset_name=args.dataset or "toy shapes")

    print(f"generating {args.prompt!r} and attributing it", flush=True)
    image = pipe(args.prompt, num_inference_steps=20, generator=torch.Generator().manual_seed(0)).images[0]
    result = pipe.attribute([image], store, prompts=args.prompt)
    best = result.topk(args.topk)
    for rank, (index, score) in enumerate(zip(best.indices[0].tolist(), best.scores[0].tolist()), start=1):
        print(f"  {rank}. training image {index} ({dataset[index]['text']!r}), score {score:.3g}")
    result.to_image_grid(dataset, k=args.topk).save(output / "attribution_grid.png")
    print(f"wrote {output / 'attribution_grid.png'} and the store {output / 'store'} "
          f"(LoRA adapters recorded: {store.metadata.get('lora_adapters')})")


if __name__ == "__main__":
    main()
