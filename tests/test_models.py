"""ddim.models: U-Net architecture, official-weights parity and loading, EMA."""
from __future__ import annotations

import json

import pytest
import torch

from ddim.models import EMA, OFFICIAL_CONFIGS, UNet, load_official_unet, unet_kwargs_from_config


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread avoids OpenMP spin-waiting on a busy 2-core machine (~5x faster)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, resolution=16)


def n_params(**kwargs) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in UNet(**kwargs).parameters())


def test_cifar10_config_has_official_parameter_count():
    assert n_params(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1,
                    resolution=32) == 35_746_307
    assert n_params(**unet_kwargs_from_config("cifar10")) == 35_746_307
    assert n_params() == 35_746_307  # the defaults are the CIFAR-10 model


def test_official_configs_build():
    sizes = {"cifar10": 32, "celeba": 64, "church": 256, "bedroom": 256, "cat": 256}
    assert set(OFFICIAL_CONFIGS) == set(sizes)
    for name, size in sizes.items():
        cfg = OFFICIAL_CONFIGS[name]
        assert cfg["data"]["image_size"] == size and unet_kwargs_from_config(cfg)["resolution"] == size
        assert cfg["diffusion"]["beta_schedule"] == "linear" and cfg["diffusion"]["num_diffusion_timesteps"] == 1000
    assert OFFICIAL_CONFIGS["church"]["model"]["ema_rate"] == 0.999
    assert OFFICIAL_CONFIGS["cifar10"]["model"]["ema_rate"] == 0.9999
    # LSUN 256 model: ~114M parameters in the DDPM paper
    assert 113e6 < n_params(**unet_kwargs_from_config("church")) < 115e6


def test_official_module_names():
    keys = set(UNet(**TINY).state_dict())
    for k in ("temb.dense.0.weight", "temb.dense.1.bias", "conv_in.weight", "down.0.block.0.norm1.weight",
              "down.0.downsample.conv.weight", "down.1.block.0.nin_shortcut.weight", "down.1.attn.0.q.weight",
              "mid.block_1.temb_proj.weight", "mid.attn_1.proj_out.bias", "mid.block_2.conv2.weight",
              "up.0.block.1.nin_shortcut.weight", "up.1.upsample.conv.weight", "up.1.attn.1.k.weight",
              "norm_out.weight", "conv_out.bias"):
        assert k in keys, k
    assert not any("temb_freqs" in k for k in keys)  # non-persistent: official dicts load strictly


@pytest.mark.parametrize("kwargs,shape", [
    (TINY, (2, 3, 16, 16)),
    (dict(TINY, resamp_with_conv=False, ch_mult=(1, 2, 2), attn_resolutions=(4,)), (3, 3, 16, 16)),
    (dict(ch=32, ch_mult=(1, 1), num_res_blocks=2, attn_resolutions=(), in_channels=1, out_ch=2,
          resolution=8, dropout=0.1), (2, 1, 8, 8)),
    (dict(ch=32, ch_mult=(2, 1), num_res_blocks=1, attn_resolutions=(16, 8), resolution=16), (1, 3, 16, 16)),
])
def test_forward_shape(kwargs, shape):
    model = UNet(**kwargs)
    out = model(torch.randn(shape), torch.randint(0, 1000, (shape[0],)))
    assert out.shape == (shape[0], kwargs.get("out_ch", 3), *shape[2:])
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert model.conv_in.weight.grad is not None and model.temb.dense[0].weight.grad.abs().sum() > 0


def test_bad_constructor_args():
    with pytest.raises(ValueError, match="multiple of 32"):
        UNet(ch=48)
    with pytest.raises(ValueError, match="divisible"):
        UNet(ch=32, ch_mult=(1, 2, 2), resolution=18)
    with pytest.raises(ValueError, match="dropout"):
        UNet(dropout=1.5)


# ---------------------------------------------------------------- official parity


def _fixture_parts(parity):
    cfg = json.loads(str(parity["model_config_json"]))
    sd = {k[len("state_dict/"):]: torch.from_numpy(v) for k, v in parity.items() if k.startswith("state_dict/")}
    eps = {int(k[len("eps/t"):]): torch.from_numpy(v) for k, v in parity.items() if k.startswith("eps/t")}
    return cfg, sd, torch.from_numpy(parity["x_T"]), eps


def _max_diff(model, x, eps, ts=None) -> float:
    with torch.no_grad():
        return max((model(x, torch.full((x.shape[0],), t, dtype=torch.long)) - e).abs().max().item()
                   for t, e in eps.items() if ts is None or t in ts)


def test_official_parity_state_dict(parity):
    cfg, sd, x, eps = _fixture_parts(parity)
    assert {0, 999} <= set(eps)
    model = load_official_unet(sd, cfg)
    assert not model.training
    assert _max_diff(model, x, eps) < 1e-4
    # channels_last and float t give the same numbers
    model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        for t, e in eps.items():
            out = model(x.to(memory_format=torch.channels_last), torch.full((x.shape[0],), float(t)))
            assert (out - e).abs().max() < 1e-4


def test_official_parity_list_checkpoint_with_module_prefix(parity, tmp_path):
    cfg, sd, x, eps = _fixture_parts(parity)
    noise = {k: torch.randn_like(v) for k, v in sd.items()}
    model_state = {"module." + k: v + 0.1 * noise[k] for k, v in sd.items()}  # not the fixture weights
    ema_state = {"module." + k: v.clone() for k, v in sd.items()}  # the official EMAHelper shadow
    path = tmp_path / "ckpt.pth"
    torch.save([model_state, {"state": {}, "param_groups": []}, 7, 1234, ema_state], path)
    # flat config form, image_size key
    flat = dict(cfg["model"], image_size=cfg["image_size"])
    assert _max_diff(load_official_unet(path, flat, use_ema=True), x, eps) < 1e-4
    assert _max_diff(load_official_unet(str(path), flat), x, eps, ts=(500,)) > 1e-3  # model_state by default
    # nested official yaml form
    nested = {"data": {"image_size": cfg["image_size"]}, "model": cfg["model"]}
    assert _max_diff(load_official_unet(path, nested, use_ema=True), x, eps, ts=(0, 999)) < 1e-4
    # a list without ema_state falls back to model_state, with a warning
    torch.save([ema_state, {}, 1, 2], path)
    with pytest.warns(UserWarning, match="no ema_state"):
        assert _max_diff(load_official_unet(path, nested, use_ema=True), x, eps, ts=(250,)) < 1e-4


def test_official_bad_checkpoints(parity, tmp_path):
    cfg, sd, _, _ = _fixture_parts(parity)
    wrong = dict(cfg["model"], ch_mult=[1, 2, 2], image_size=cfg["image_size"])
    with pytest.raises(ValueError, match=r"<state dict>.*missing keys: down\.1\.downsample.*down\.2\.block"):
        load_official_unet(sd, wrong)
    with pytest.raises(ValueError, match=r"shape mismatch: temb\.dense\.0\.weight: checkpoint \(128, 32\) vs model \(256, 64\)"):
        load_official_unet(sd, dict(cfg["model"], ch=64, image_size=16))
    extra = dict(sd, **{"logvar": torch.zeros(1000)})
    with pytest.raises(ValueError, match="unexpected keys: logvar"):
        load_official_unet(extra, cfg)
    corrupt = tmp_path / "broken.ckpt"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match=r"broken\.ckpt.*corrupt"):
        load_official_unet(corrupt, cfg)
    path = tmp_path / "wrong.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("mid.")}, path)
    with pytest.raises(ValueError, match=r"wrong\.pth.*missing keys: mid\."):
        load_official_unet(path, cfg)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_official_unet(tmp_path / "nope.ckpt", cfg)
    with pytest.raises(ValueError, match="unknown official config 'imagenet'"):
        load_official_unet(sd, "imagenet")
    with pytest.raises(ValueError, match=r"unknown model config keys \['chmult'\]"):
        load_official_unet(sd, {"chmult": [1, 2], "resolution": 16})


# ---------------------------------------------------------------- EMA


def test_ema_matches_official_formula():
    torch.manual_seed(0)
    model = UNet(**TINY)
    decay = 0.9
    ema = EMA(model, decay=decay)
    assert ema.module is not model and not ema.module.training
    shadow = {k: v.detach().clone() for k, v in model.named_parameters()}  # official EMAHelper.register
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 16, 16)
    for _ in range(3):
        opt.zero_grad()
        model(x, torch.tensor([3, 700])).square().mean().backward()
        opt.step()
        ema.update(model)
        for k, p in model.named_parameters():
            shadow[k] = (1.0 - decay) * p.detach() + decay * shadow[k]
    assert int(ema.n_averaged) == 4  # seeded copy + 3 updates
    ema_params = dict(ema.module.named_parameters())
    for k, p in model.named_parameters():
        torch.testing.assert_close(ema_params[k], shadow[k], rtol=1e-6, atol=1e-7)
        assert not ema_params[k].requires_grad
    assert not torch.equal(ema_params["conv_in.weight"], model.conv_in.weight)
    # sampling with the EMA copy
    with torch.no_grad():
        assert ema(x, torch.tensor([1, 2])).shape == x.shape


@pytest.mark.parametrize("decay, updates", [(0.9998, 17772), (0.9999, 3), (0.999, 50), (0.5, 7), (0.0, 4), (0.9, 0)])
def test_ema_initial_share_is_the_product_of_the_decays(decay, updates):
    """ema_initial_share (closed form) = the product of ema_decay_at over the updates, with and without warm-up."""
    from ddim.models.ema import ema_decay_at, ema_initial_share

    for warmup in (False, True):
        prod = 1.0
        for n in range(updates):
            prod *= ema_decay_at(decay, n, warmup)
        assert ema_initial_share(decay, updates, warmup) == pytest.approx(prod, rel=1e-9, abs=1e-300)
    assert ema_initial_share(0.9998, 17772, False) == pytest.approx(0.0286, rel=1e-2)  # the FID-99 run


def test_ema_state_dict_roundtrip_and_official_shadow():
    torch.manual_seed(1)
    model = UNet(**TINY)
    ema = EMA(model)
    assert ema.decay == 0.9999
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    sd = ema.state_dict()
    assert "n_averaged" in sd and "module.conv_in.weight" in sd
    fresh = EMA(UNet(**TINY))
    fresh.load_state_dict(sd)
    for a, b in zip(fresh.module.parameters(), ema.module.parameters()):
        assert torch.equal(a, b)
    # official EMAHelper.shadow (module.-prefixed parameter names)
    official = {"module." + k: v + 2.0 for k, v in model.state_dict().items()}
    fresh.load_shadow(official)
    torch.testing.assert_close(fresh.module.conv_out.bias, model.conv_out.bias + 2.0)
    with pytest.raises(ValueError, match="lacks parameters"):
        fresh.load_shadow({"conv_in.weight": model.conv_in.weight})
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model = UNet(**TINY).eval()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 900])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), model(x, t))


def test_bf16_autocast_forward():
    model = UNet(**TINY).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 900])
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x.to(memory_format=torch.channels_last), t)
    assert out.shape == ref.shape and (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_unet_cast_to_bf16_keeps_exact_timestep_phases_and_runs():
    """A model cast with .to(bfloat16) (the 'pure' low-precision path of ddim.accel.inference) still computes the
    sinusoidal embedding from float32 frequencies (bf16 phases would be off by radians at t ~ 1000) and
    its forward accepts bf16 inputs."""
    from ddim.models import UNet

    torch.manual_seed(0)
    model = UNet(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0,
                 in_channels=3, resolution=16, resamp_with_conv=True).eval()
    t = torch.tensor([0, 1, 500, 999])
    emb32 = model.timestep_embedding(t)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = model(x, t)
        low = model.to(torch.bfloat16)
        assert low.temb_freqs.dtype == torch.bfloat16  # the cast did touch the buffer ...
        assert torch.equal(low.timestep_embedding(t), emb32)  # ... but not the phases
        out = low(x.to(torch.bfloat16), t)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_attention_gives_sdpa_four_dimensional_inputs(monkeypatch):
    """SDPA's flash / memory-efficient kernels take (B, heads, L, D) only; 3-d inputs silently fall back to
    the math path (fp32 matrix products under autocast, ~5x slower attention on an H100)."""
    import torch.nn.functional as F

    from ddim.models import unet as unet_mod

    shapes = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        shapes.append((q.shape, k.shape, v.shape))
        return real(q, k, v, **kw)

    monkeypatch.setattr(unet_mod.F, "scaled_dot_product_attention", spy)
    block = unet_mod.AttnBlock(64)
    x = torch.randn(2, 64, 4, 6)
    out = block(x)
    assert shapes and all(len(s) == 4 and s[:2] == (2, 1) and s[2:] == (24, 64) for qkv in shapes for s in qkv)
    # and the result is the official attention: softmax(q^T k / sqrt(C)) v over the H*W pixels
    h = block.norm(x)
    q, k, v = (m(h).flatten(2) for m in (block.q, block.k, block.v))  # (B, C, HW)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * 64 ** -0.5, dim=2)
    ref = x + block.proj_out(torch.einsum("bcj,bij->bci", v, w).reshape(x.shape))
    assert torch.allclose(out, ref, atol=1e-5)

    # On channels_last input q, k, v are views of one projection (no re-layout pass before the attention
    # kernel), and the result stays channels_last.
    captured = []

    def keep(q, k, v, **kw):
        captured.append((q, k, v))
        return real(q, k, v, **kw)

    monkeypatch.setattr(unet_mod.F, "scaled_dot_product_attention", keep)
    out_cl = block(x.contiguous(memory_format=torch.channels_last))
    q, k, v = captured[-1]
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out_cl, ref, atol=1e-5)
