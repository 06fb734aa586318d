"""The visual embedding highway: zero init, eq. 4's α, residual shapes, phase-3b training."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel, UNet3DConditionModel

from xvila.decoders.base import Cancelled, DecodeSettings, Decoder, denoise, denoising_loss, use_highway
from xvila.decoders.controller import VisualController, prepare_e_vis, unet_skip_slots

E_VIS_DIM = 24  # a tiny ImageBind vision width


class LatentDecoder(Decoder):
    """A decoder reduced to its U-Net and scheduler: the loop's output is the latents."""

    modality = "image"

    def __init__(self, unet, frames=None):
        super().__init__()
        self.unet = unet
        self.frames = frames
        self.scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000)
        self.controller = VisualController.from_unet(unet, E_VIS_DIM)
        self.negative = torch.zeros(1, 77, unet.config.cross_attention_dim)

    def latent_shape(self, s):
        return (4, 8, 8) if self.frames is None else (4, self.frames, 8, 8)

    def unet_condition(self, e, s):
        return {"encoder_hidden_states": e}

    def negative_condition(self):
        return self.negative


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    ).eval()


@pytest.fixture
def decoder():
    return LatentDecoder(tiny_unet())


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(77, 16, generator=g), torch.randn(16, 16, E_VIS_DIM, generator=g)


def test_fresh_controller_leaves_the_output_bit_identical(decoder):
    e_text, e_vis = _inputs()
    s = DecodeSettings(steps=3, guidance=3.0, alpha=1.0)
    ta = denoise(decoder, e_text, s)
    veh = denoise(decoder, e_text, s, e_vis=e_vis)
    assert torch.equal(ta, veh)


def test_one_phase_3b_step_makes_the_highway_matter(decoder):
    e_text, e_vis = _inputs()
    s = DecodeSettings(steps=3, guidance=3.0, alpha=1.0)
    before = denoise(decoder, e_text, s, e_vis=e_vis)
    params = list(decoder.controller.parameters()) + list(decoder.unet.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    x0 = torch.randn(2, 4, 8, 8)
    loss = denoising_loss(decoder.train(), x0, e_text[None].expand(2, -1, -1), e_vis[None].expand(2, -1, -1, -1),
                          generator=torch.Generator().manual_seed(0))
    loss.backward()
    zero_grads = [p.grad for p in decoder.controller.zero_convs.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in zero_grads)  # the zero convs do learn
    opt.step()
    decoder.eval()
    ta = denoise(decoder, e_text, s)
    veh = denoise(decoder, e_text, s, e_vis=e_vis)
    assert not torch.equal(ta, veh)
    assert not torch.equal(before, veh)


@pytest.mark.parametrize("alpha,expected", [(0.0, 0), (0.5, None), (1.0, 10)])
def test_alpha_decides_on_which_steps_residuals_go_in(decoder, monkeypatch, alpha, expected):
    calls = []
    unet_forward = decoder.unet.forward

    def spy(x, t, **kw):
        calls.append((float(t), "down_block_additional_residuals" in kw and "mid_block_additional_residual" in kw))
        return unet_forward(x, t, **kw)

    monkeypatch.setattr(decoder.unet, "forward", spy)
    e_text, e_vis = _inputs()
    denoise(decoder, e_text, DecodeSettings(steps=10, guidance=1.0, alpha=alpha), e_vis=e_vis)
    assert len(calls) == 10
    with_res = [t for t, used in calls if used]
    if expected is None:  # α = 0.5: exactly the steps whose timestep is below 500
        assert with_res == [t for t, _ in calls if t < 500] and 0 < len(with_res) < 10
    else:
        assert len(with_res) == expected
    assert use_highway(499, 1000, 0.5) and not use_highway(500, 1000, 0.5)


def test_without_visual_input_or_with_alpha_zero_the_controller_is_not_run(decoder, monkeypatch):
    ran = []
    monkeypatch.setattr(decoder.controller, "forward", lambda *a: ran.append(1))
    e_text, e_vis = _inputs()
    denoise(decoder, e_text, DecodeSettings(steps=2, alpha=0.0), e_vis=None)
    assert not ran


def test_video_clips_are_pooled_and_residuals_repeat_per_frame():
    clips = torch.randn(5, 16, 16, E_VIS_DIM)
    torch.testing.assert_close(prepare_e_vis(clips)[0], clips.mean(0))
    torch.manual_seed(0)
    unet = UNet3DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    ).eval()
    ctrl = VisualController.from_unet(unet, E_VIS_DIM)
    for p in ctrl.zero_convs.parameters():  # make the residuals non-zero
        torch.nn.init.normal_(p)
    down, mid = ctrl(prepare_e_vis(clips), (4, 3, 8, 8))
    assert all(r.shape[0] == 3 and torch.equal(r[0], r[2]) for r in down)
    with torch.no_grad():  # the 3D U-Net accepts them and they change its prediction
        x, e = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 77, 16)
        plain = unet(x, 10, encoder_hidden_states=e).sample
        guided = unet(x, 10, encoder_hidden_states=e, down_block_additional_residuals=down,
                      mid_block_additional_residual=mid).sample
    assert not torch.allclose(plain, guided)


SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8)
VC2 = dict(in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
           down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
           up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3, cross_attention_dim=1024, attention_head_dim=64)


def _skip_shapes(unet, x, cond):
    """The shapes of the skips a U-Net's down path produces (read with hooks, on meta)."""
    shapes = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))]
    for block in unet.down_blocks:
        hooks.append(block.register_forward_hook(lambda m, i, o: shapes.extend(tuple(t.shape) for t in o[1])))
    mid = []
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: mid.append(tuple(o.shape))))
    unet(x, 10, encoder_hidden_states=cond)
    for h in hooks:
        h.remove()
    return shapes, mid[0]


@pytest.mark.parametrize("name", ["sd15-512", "videocrafter2-320x512"])
def test_residuals_fit_every_down_block_of_the_full_size_unets(name):
    with torch.device("meta"):
        if name == "sd15-512":
            unet = UNet2DConditionModel(**SD15)
            latent, x, cond = (4, 64, 64), torch.empty(1, 4, 64, 64), torch.empty(1, 77, 768)
        else:
            unet = UNet3DConditionModel(**VC2)
            latent, x, cond = (4, 16, 40, 64), torch.empty(1, 4, 16, 40, 64), torch.empty(1, 77, 1024)
        ctrl = VisualController.from_unet(unet, 1280)
        skips, mid_shape = _skip_shapes(unet, x, cond)
        down, mid = ctrl(torch.empty(1, 16, 16, 1280), latent)
    assert len(skips) == len(unet_skip_slots(unet.config)[0]) == 12
    assert [tuple(r.shape) for r in down] == skips
    assert tuple(mid.shape) == mid_shape


def test_cancellation_between_steps(decoder):
    e_text, _ = _inputs()
    seen = []
    with pytest.raises(Cancelled):
        denoise(decoder, e_text, DecodeSettings(steps=5), progress=lambda i, n: seen.append((i, n)),
                should_stop=lambda: len(seen) == 2)
    assert seen == [(1, 5), (2, 5)]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_noise_follows_the_timestep(decoder, monkeypatch, prediction_type):
    """t = 999 must be almost pure noise and t = 0 almost clean: SD1.5's scaled-linear betas
    give sqrt(alpha_bar) = 0.068 at t = 999 and 0.9996 at t = 0 (computed here by hand)."""
    decoder.scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                                    beta_start=0.00085, beta_end=0.012,
                                                    prediction_type=prediction_type)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)
    seen = {}

    def spy(x, t, **kw):
        seen["x"], seen["t"] = x.detach().clone(), t.clone()
        seen["pred"] = torch.zeros_like(x, requires_grad=True)
        return (seen["pred"],)

    monkeypatch.setattr(decoder.unet, "forward", spy)
    x0 = torch.full((64, 4, 8, 8), 3.0)
    e_text, _ = _inputs()
    loss = denoising_loss(decoder, x0, e_text[None].expand(64, -1, -1), generator=torch.Generator().manual_seed(0))
    a = alpha_bar[seen["t"]].float().view(-1, 1, 1, 1)
    noise = (seen["x"] - a.sqrt() * x0) / (1 - a).sqrt()
    # what went in is sqrt(a)·x0 + sqrt(1-a)·noise with unit-variance noise at every t
    assert abs(noise.std().item() - 1.0) < 0.05
    assert abs(noise.mean().item()) < 0.05
    target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    assert loss.item() == pytest.approx(target.pow(2).mean().item(), rel=1e-3)
