"""The tiny offline pipelines in ``diffusers_attribution.testing`` build, run and are seeded."""

import socket

import pytest
import torch

import tiny_pipelines as T

PROMPT = dict(prompt="a cat", max_sequence_length=16)

# name -> (builder, call kwargs, expected "pt" image shape)
BUILDERS = {
    "ddpm": (T.tiny_ddpm_pipeline, dict(batch_size=1), (1, 1, 8, 8)),
    "sd": (T.tiny_stable_diffusion_pipeline, dict(prompt="a cat"), (1, 3, 16, 16)),
    "sdxl": (T.tiny_sdxl_pipeline, dict(prompt="a cat"), (1, 3, 16, 16)),
    "dit": (T.tiny_dit_pipeline, dict(class_labels=[1]), (1, 3, 16, 16)),
    "pixart": (
        T.tiny_pixart_pipeline,
        dict(**PROMPT, use_resolution_binning=False, clean_caption=False),
        (1, 3, 16, 16),
    ),
    "sd3": (T.tiny_sd3_pipeline, PROMPT, (1, 3, 16, 16)),
    "flux": (T.tiny_flux_pipeline, dict(**PROMPT, height=16, width=16), (1, 3, 16, 16)),
}


@pytest.fixture(autouse=True, scope="module")
def offline():
    """Fail on any network connection."""
    original_connect = socket.socket.connect

    def no_network(*args, **kwargs):
        raise RuntimeError("tiny fixtures must not touch the network")

    socket.socket.connect = no_network
    yield
    socket.socket.connect = original_connect


def _denoiser(pipe):
    return getattr(pipe, T.denoiser_name(pipe))


def _run(pipe, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipe(num_inference_steps=2, output_type="pt", generator=generator, **kwargs).images


@pytest.mark.parametrize("name", list(BUILDERS))
def test_builder_runs_and_is_seeded(name):
    builder, call_kwargs, shape = BUILDERS[name]
    pipe = builder(seed=0)
    image = _run(pipe, **call_kwargs)
    assert tuple(image.shape) == shape
    assert torch.isfinite(image).all()

    again = _denoiser(builder(seed=0)).state_dict()
    for key, value in _denoiser(pipe).state_dict().items():
        assert torch.equal(value, again[key]), key
    other = _denoiser(builder(seed=1)).state_dict()
    assert any(not torch.equal(v, other[k]) for k, v in _denoiser(pipe).state_dict().items())


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(scheduler="ddim", prediction_type="v_prediction", in_channels=3), (1, 3, 8, 8)),
        (dict(attention=False, sample_size=16, prediction_type="sample"), (1, 1, 16, 16)),
    ],
)
def test_ddpm_variants(kwargs, shape):
    from diffusers import DDIMPipeline, DDPMPipeline

    pipe = T.tiny_ddpm_pipeline(**kwargs)
    expected = DDIMPipeline if kwargs.get("scheduler") == "ddim" else DDPMPipeline
    assert type(pipe) is expected
    assert pipe.scheduler.config.prediction_type == kwargs["prediction_type"]
    assert pipe.scheduler.config.num_train_timesteps == 1000
    has_attention = any("attentions" in key for key in pipe.unet.state_dict())
    assert has_attention == kwargs.get("attention", True)
    assert tuple(_run(pipe, batch_size=1).shape) == shape


@pytest.mark.parametrize("scheduler", ["ddpm", "pndm", "euler"])
def test_stable_diffusion_schedulers(scheduler):
    pipe = T.tiny_stable_diffusion_pipeline(scheduler=scheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert tuple(_run(pipe, prompt="a cat").shape) == (1, 3, 16, 16)


def test_tokenizers_are_byte_level():
    clip = T.tiny_clip_tokenizer()
    assert len(clip) == 514 and clip.model_max_length == 77
    ids = clip("Héllo, world!").input_ids
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
    assert clip.unk_token_id not in ids[1:-1]
    t5 = T.tiny_t5_tokenizer()
    assert t5("a cat").input_ids[-1] == t5.eos_token_id
    assert t5.decode(t5("A cat!").input_ids, skip_special_tokens=True) == "A cat!"


def _unet_output(pipe):
    unet = pipe.unet
    generator = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    sample = torch.randn(1, unet.config.in_channels, size, size, generator=generator)
    context = torch.randn(1, 5, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=context).sample


def _has_lora(model):
    return bool(getattr(model, "peft_config", None)) or any("lora" in k for k in model.state_dict())


def test_lora_round_trip(tmp_path):
    pipe = T.tiny_stable_diffusion_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    T.save_tiny_lora(pipe, tmp_path, rank=4, adapter_name="tiny")
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()
    assert not _has_lora(pipe.unet)
    assert pipe.unet.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())

    fresh = T.tiny_stable_diffusion_pipeline()
    base = _unet_output(fresh)
    fresh.load_lora_weights(tmp_path, adapter_name="x")
    assert "x" in fresh.unet.peft_config and fresh.unet.peft_config["x"].r == 4
    assert (_unet_output(fresh) - base).abs().max() > 1e-3
    assert tuple(_run(fresh, prompt="a cat").shape) == (1, 3, 16, 16)


def test_lora_on_transformer_pipeline(tmp_path):
    pipe = T.tiny_flux_pipeline()
    T.save_tiny_lora(pipe, tmp_path)
    assert not _has_lora(pipe.transformer)
    kwargs = dict(**PROMPT, height=16, width=16)
    base = _run(pipe, **kwargs)
    pipe.load_lora_weights(tmp_path, adapter_name="x")
    assert (_run(pipe, **kwargs) - base).abs().max() > 1e-4
