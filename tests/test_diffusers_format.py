"""The Hub's diffusers DDPM models in, and export to diffusers (ddim.models.diffusers_format).

No network: the Hub models are built locally from their configs (written out below, as published), with random
weights.  The full configs are checked key by key and shape by shape on the meta device; the forward parity runs on
narrow variants with the same block types (the full 256x256 nets take seconds per forward on a CPU).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ddim.checkpoints import export_diffusers, main
from ddim.diffusion import sample, timesteps
from ddim.diffusion.schedules import alphas_cumprod_from_config
from ddim.evaluation.runner import check_pretrained_source
from ddim.models import UNet
from ddim.models import diffusers_format as df
from test_evaluate import one_thread, records, run_evaluate  # noqa: F401  (one_thread: autouse fixture)

diffusers = pytest.importorskip("diffusers")

_COMMON = {"_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu", "attention_head_dim": None,
           "center_input_sample": False, "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1,
           "in_channels": 3, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06,
           "norm_num_groups": 32, "out_channels": 3, "time_embedding_type": "positional"}
_CONFIG_256 = {**_COMMON, "block_out_channels": [128, 128, 256, 256, 512, 512], "sample_size": 256,
               "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                                    "DownBlock2D"],
               "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"]}
# config.json of each Hub model (the four 256x256 ones share the LSUN/CelebA-HQ architecture of the DDPM paper)
HUB_CONFIGS = {
    "google/ddpm-cifar10-32": {**_COMMON, "block_out_channels": [128, 256, 256, 256], "sample_size": 32,
                               "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                               "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]},
    "google/ddpm-ema-church-256": _CONFIG_256,
    "google/ddpm-ema-bedroom-256": _CONFIG_256,
    "google/ddpm-ema-cat-256": _CONFIG_256,
    "google/ddpm-ema-celebahq-256": _CONFIG_256,
}
HUB_SCHEDULER = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02,
                 "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000,
                 "trained_betas": None, "variance_type": "fixed_large"}
EXPECTED_KWARGS = {"google/ddpm-cifar10-32": ((1, 2, 2, 2), 32), **{k: ((1, 1, 2, 2, 4, 4), 256) for k in HUB_CONFIGS
                                                                   if k.endswith("-256")}}
LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
LINEAR = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_diffusion_timesteps": 1000}


def diffusers_unet(config: dict, device: str = "cpu"):
    with torch.device(device):
        torch.manual_seed(0)
        return diffusers.UNet2DModel.from_config(config).eval()


def narrow(config: dict) -> dict:
    """The same block types and depth at a quarter of the width (128 -> 32 channels)."""
    return {**config, "block_out_channels": [c // 4 for c in config["block_out_channels"]]}


def with_legacy_attention_names(sd: dict) -> dict:
    """The attention weights as files from before diffusers' Attention class name them (ddpm-cifar10-32's)."""
    out = {}
    for k, v in sd.items():
        for new, old in LEGACY.items():
            k = k.replace(f".{new}.", f".{old}.")
        out[k] = v
    return out


def tiny_unet(in_channels: int = 3, resolution: int = 8, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(ch=32, out_ch=in_channels, in_channels=in_channels, ch_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(resolution // 2,), dropout=0.0, resolution=resolution).eval()


@pytest.mark.parametrize("hub_id", list(HUB_CONFIGS))
def test_full_hub_config_maps_every_key_and_shape(hub_id):
    """Each Hub model's full config: every UNet2DModel weight (attention under the names the Hub's files use) maps
    onto one of the project's U-Net, shapes equal.  diffusers' current names: the export round trips below."""
    sd = with_legacy_attention_names(diffusers_unet(HUB_CONFIGS[hub_id], "meta").state_dict())
    kwargs, converted = df.unet_state_dict_from_diffusers(sd, HUB_CONFIGS[hub_id])
    ch_mult, size = EXPECTED_KWARGS[hub_id]
    assert (kwargs["ch"], kwargs["ch_mult"], kwargs["attn_resolutions"], kwargs["resolution"]) == (128, ch_mult,
                                                                                                   (16,), size)
    with torch.device("meta"):
        target = UNet(**kwargs).state_dict()
    assert converted.keys() == target.keys() and len(sd) == len(target)
    assert all(converted[k].shape == v.shape for k, v in target.items())


@pytest.mark.parametrize("hub_id", ["google/ddpm-cifar10-32", "google/ddpm-ema-church-256"])
def test_converted_eps_equals_diffusers_forward(hub_id, tmp_path):
    """ε of the converted U-Net is UNet2DModel's ε to float rounding (t from 0 to 999: the embedding's phases); the
    folder as diffusers' own save_pretrained writes it (UNet and scheduler config at the root) loads."""
    config = narrow(HUB_CONFIGS[hub_id])
    reference = diffusers_unet(config)
    reference.save_pretrained(tmp_path)
    diffusers.DDPMScheduler.from_config(HUB_SCHEDULER).save_pretrained(tmp_path)
    model, ac, cfg = df.load_diffusers_for_sampling(tmp_path)
    assert torch.equal(ac, alphas_cumprod_from_config(LINEAR)) and cfg["model"]["ch"] == 32
    x, t = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 517, 999])
    with torch.no_grad():
        want, got = reference(x, t).sample, model(x, t)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_non_ddpm_unet2dmodel_is_refused():
    config = narrow(HUB_CONFIGS["google/ddpm-cifar10-32"])
    for change, named in (({"flip_sin_to_cos": True}, "flip_sin_to_cos=True"),
                          ({"attention_head_dim": 8}, "attention_head_dim=8"),
                          ({"freq_shift": 0}, "freq_shift=0"),
                          ({"up_block_types": ["UpBlock2D"] * 4}, "up_block_types")):
        with pytest.raises(ValueError, match=named):
            df.unet_kwargs_from_diffusers({**config, **change})
    no_default = {k: v for k, v in config.items() if k != "downsample_padding"}  # diffusers' default pads by 1
    with pytest.raises(ValueError, match="downsample_padding=1"):
        df.unet_kwargs_from_diffusers(no_default)
    sd = diffusers_unet(config, "meta").state_dict()
    missing = dict(sd)
    del missing["mid_block.attentions.0.to_q.weight"]
    with pytest.raises(ValueError, match=r"missing: mid_block\.attentions\.0\.to_q\.weight"):
        df.unet_state_dict_from_diffusers(missing, config)
    with pytest.raises(ValueError, match=r"unused: class_embedding\.weight"):
        df.unet_state_dict_from_diffusers({**sd, "class_embedding.weight": torch.zeros(4, 4)}, config)
    with pytest.raises(ValueError, match="conv_in.weight"):
        df.unet_state_dict_from_diffusers({**sd, "conv_in.weight": torch.zeros(32, 4, 3, 3)}, config)


def test_scheduler_config_gives_the_project_schedule():
    diffusion = df.diffusion_from_scheduler_config(HUB_SCHEDULER)
    assert diffusion == LINEAR
    for diffusers_name, ours in (("scaled_linear", "quad"), ("squaredcos_cap_v2", "cosine"), ("sigmoid", "sigmoid")):
        assert df.diffusion_from_scheduler_config({**HUB_SCHEDULER, "beta_schedule": diffusers_name})[
            "beta_schedule"] == ours
    betas = torch.linspace(1e-3, 0.2, 10, dtype=torch.float64)
    ac = df.alphas_cumprod_of(df.diffusion_from_scheduler_config({"num_train_timesteps": 10,
                                                                  "trained_betas": betas.tolist()}))
    assert torch.equal(ac, torch.cumprod(1 - betas, 0))
    for bad, named in (({"prediction_type": "v_prediction"}, "prediction_type"),
                       ({"beta_schedule": "exp"}, "beta_schedule='exp'")):
        with pytest.raises(ValueError, match=named):
            df.diffusion_from_scheduler_config({**HUB_SCHEDULER, **bad})


@pytest.mark.parametrize("schedule", ["linear", "cosine", None])
def test_export_round_trip_is_bit_identical(tmp_path, schedule):
    """project -> diffusers folder -> project: the same weights and ᾱ bit for bit, hence the same samples; without a
    named schedule ᾱ goes as trained_betas and comes back to float64 rounding."""
    model = tiny_unet()
    diffusion = {**LINEAR, "beta_schedule": schedule} if schedule else None
    ac = alphas_cumprod_from_config(diffusion or {**LINEAR, "beta_schedule": "quad"})
    folder = df.save_diffusers_folder(model, ac, tmp_path / "out", diffusion=diffusion,
                                      info={"data": {"name": "cifar10", "image_size": 8, "channels": 3}})
    back, ac_back, cfg = df.load_diffusers_for_sampling(folder)
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    assert cfg["model"]["ch_mult"] == (1, 2) and cfg["data"]["image_size"] == 8 and cfg["source"]["hub_id"] is None
    if schedule is None:
        torch.testing.assert_close(ac_back, ac, rtol=1e-13, atol=0)
        return
    assert torch.equal(ac_back, ac) and cfg["diffusion"] == diffusion
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    seq = timesteps(1000, 5)
    assert torch.equal(sample(back, x_T, ac_back, seq), sample(model, x_T, ac, seq))


def test_exported_folder_samples_in_diffusers_as_in_the_project(tmp_path):
    """diffusers' DDIMScheduler (η = 0, S steps) over the exported UNet2DModel gives this project's η = 0 samples on
    the linear trajectory from the same x_T: the scheduler config carries the project's conventions; and
    DDIMPipeline loads and runs the folder."""
    model = tiny_unet()
    ac = alphas_cumprod_from_config(LINEAR)
    folder = df.save_diffusers_folder(model, ac, tmp_path / "out", diffusion=LINEAR)
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder / "scheduler")
    S = 10
    scheduler.set_timesteps(S)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x = x_T
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    want = sample(model, x_T, ac, timesteps(1000, S))
    assert scheduler.timesteps.flip(0).tolist() == timesteps(1000, S).tolist()
    torch.testing.assert_close(x, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    images = diffusers.DDIMPipeline.from_pretrained(folder)(batch_size=1, num_inference_steps=2, output_type="np",
                                                            generator=torch.manual_seed(0)).images
    assert images.shape == (1, 8, 8, 3)


def train_checkpoint(path: Path) -> dict:
    """A checkpoint in train.py's format whose EMA and raw weights differ."""
    raw, ema = tiny_unet(1, seed=0), tiny_unet(1, seed=1)
    model = {"ch": 32, "out_ch": 1, "in_channels": 1, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4],
             "dropout": 0.0, "resolution": 8, "resamp_with_conv": True}
    ckpt = {"state_dict": {**{f"model.{k}": v for k, v in raw.state_dict().items()},
                           **{f"ema_model.{k}": v for k, v in ema.state_dict().items()}},
            "hyper_parameters": {"model": model, "diffusion": {**LINEAR, "beta_schedule": "cosine"}, "optim": {},
                                 "data": {"name": "digits", "image_size": 8, "channels": 1, "category": None}},
            "global_step": 10**6}
    torch.save(ckpt, path)
    return {"raw": raw.state_dict(), "ema": ema.state_dict()}


def test_export_diffusers_command(tmp_path, capsys, monkeypatch):

    weights = train_checkpoint(tmp_path / "last.ckpt")
    for flag, which in (([], "ema"), (["--raw"], "raw")):
        out = tmp_path / which
        main(["export-diffusers", str(tmp_path / "last.ckpt"), str(out), *flag])
        assert f"pretrained={out}" in capsys.readouterr().out
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, _, cfg = df.load_diffusers_for_sampling(out)
        assert any("non-EMA" in str(w.message) for w in caught) is (which == "raw")
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights[which].items())
        assert cfg["ema"] is (which == "ema") and cfg["data"]["name"] == "digits"
        assert cfg["diffusion"]["beta_schedule"] == "cosine"
        scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
        assert scheduler["beta_schedule"] == "squaredcos_cap_v2" and scheduler["steps_offset"] == 0
    with pytest.raises(SystemExit) as exits:
        main(["export-diffusers", str(tmp_path / "last.ckpt"), str(tmp_path / "ema")])
    assert exits.value.code == 2 and "exists" in capsys.readouterr().err

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        main(["export-diffusers", str(tmp_path / "last.ckpt"), str(tmp_path / "half")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema", "last.ckpt", "raw"]  # no half folder, no temporary


def fake_hub_cache(root: Path, hub_id: str, model: UNet) -> Path:
    """The Hub cache layout snapshot_download leaves (refs/main -> snapshots/<commit>), the UNet at the root."""
    repo = root / f"models--{hub_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    exported = df.save_diffusers_folder(model, alphas_cumprod_from_config(LINEAR), root / "export", diffusion=LINEAR)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for src, dst in (("unet/config.json", "config.json"), ("unet/diffusion_pytorch_model.safetensors",
                                                           "diffusion_pytorch_model.safetensors")):
        (snapshot / dst).write_bytes((exported / src).read_bytes())
    (snapshot / "scheduler_config.json").write_text(json.dumps(HUB_SCHEDULER))
    return snapshot


def test_hub_id_from_the_cache_and_offline_error(tmp_path, monkeypatch):
    """A Hub id loads from the Hub cache offline (its commit recorded; ddpm-cifar10-32: CIFAR-10, not EMA, warned);
    an id not in the cache stops with a message naming it and the local-folder way."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    fake_hub_cache(tmp_path, "google/ddpm-cifar10-32", tiny_unet(resolution=32))
    with pytest.warns(UserWarning, match="non-EMA"):
        _, _, cfg = df.load_diffusers_for_sampling("google/ddpm-cifar10-32", cache_dir=tmp_path)
    assert cfg["source"]["revision"] == "0123456789abcdef0123456789abcdef01234567"
    assert cfg["data"]["name"] == "cifar10" and cfg["ema"] is False
    with pytest.raises(FileNotFoundError, match=r"google/ddpm-ema-church-256.*pretrained=DIR"):
        df.load_diffusers_for_sampling("google/ddpm-ema-church-256", cache_dir=tmp_path)


def test_evaluate_pretrained_folder(monkeypatch, tmp_path):
    """evaluate.py pretrained=<exported folder>: the data set comes from the folder, the record names the folder and
    EMA; an unknown data set without dataset= stops before the weights are read."""

    train_checkpoint(tmp_path / "last.ckpt")

    folder = export_diffusers(tmp_path / "last.ckpt", tmp_path / "digits-diffusers")
    run_evaluate(monkeypatch, tmp_path / "logs", f"pretrained={folder}", "task=samples", "samples.num_samples=2",
                 "sampler.steps=2", f"output_dir={tmp_path / 'samples'}")
    (rec,) = records(tmp_path / "logs")
    assert rec["key"]["model"]["pretrained"] == str(folder.resolve()) and rec["key"]["model"]["ema"] is True
    assert rec["key"]["dataset"] == "digits-8" and (tmp_path / "samples" / "samples.png").is_file()
    info = json.loads((folder / "ddim.json").read_text())
    (folder / "ddim.json").write_text(json.dumps({**info, "data": None}))
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not read")  # reading it would fail
    with pytest.raises(ValueError, match="pass dataset="):
        run_evaluate(monkeypatch, tmp_path / "logs", f"pretrained={folder}", "task=samples")
    with pytest.raises(ValueError, match="two models given"):
        check_pretrained_source(OmegaConf.create({"pretrained": str(folder), "ckpt_path": "x.ckpt"}))
    with pytest.raises(ValueError, match="neither an existing folder nor a Hugging Face Hub id"):
        check_pretrained_source(OmegaConf.create({"pretrained": "not/a/hub-id"}))
    check_pretrained_source(OmegaConf.create({"pretrained": "cifar10"}))  # a released name: known, not downloaded
