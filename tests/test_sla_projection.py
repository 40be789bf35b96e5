"""SLA's calibrated map of its marginal part (the short fine-tune of the linear part) and its
closed-form fit (``longattn.eval.sla_fit``)."""

import pytest
import torch

from longattn import attention
from longattn.calibration import Calibration
from longattn.eval import sla_fit
from longattn.methods import SLA
from longattn.methods.sla import PROJ_B, PROJ_W
from longattn.testing import make_qkv
from longattn.types import FeatureView

N_KV, GROUP, DIM = 2, 3, 16
FORMS = [("expansion", "mass"), ("elu", "mass"), ("elu", "shared"), ("taylor", "mass")]


def view(cal, layer=0):
    return FeatureView("query", layer, DIM**-0.5, cal, None)


def qkv(dtype=torch.float64, length=64, seed=1):
    return make_qkv(2, N_KV * GROUP, N_KV, length, length, DIM, dtype=dtype, seed=seed)


def random_map(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    w = 0.3 * torch.randn(N_KV, GROUP, DIM, DIM, generator=gen, dtype=dtype)
    return {PROJ_W: w, PROJ_B: torch.randn(N_KV, GROUP, DIM, generator=gen, dtype=dtype)}


def identity_map(dtype=torch.float64):
    eye = torch.eye(DIM, dtype=dtype).expand(N_KV, GROUP, DIM, DIM).clone()
    return {PROJ_W: eye, PROJ_B: torch.zeros(N_KV, GROUP, DIM, dtype=dtype)}


@pytest.mark.parametrize("feature, combine", FORMS)
def test_the_identity_map_is_the_training_free_form(feature, combine):
    method = SLA(block_size=8, critical=0.2, marginal=0.6, feature=feature, combine=combine)
    q, k, v = qkv()
    plain = method.forward(q, k, v, None, view(None))[0]
    torch.testing.assert_close(method.forward(q, k, v, None, view(identity_map()))[0], plain,
                               rtol=0, atol=1e-14)  # fmt: skip
    torch.testing.assert_close(method.reference(q, k, v, view(identity_map())), plain)


@pytest.mark.parametrize("feature, combine", FORMS)
def test_a_map_agrees_with_its_reference_and_float32_stays_within_the_bound(feature, combine):
    method = SLA(block_size=8, critical=0.2, marginal=0.6, feature=feature, combine=combine)
    q, k, v = qkv()
    cal = random_map()
    ref = method.reference(q, k, v, view(cal))
    out = method.forward(q, k, v, None, view(cal))[0]
    torch.testing.assert_close(out, ref)
    assert (out - method.forward(q, k, v, None, view(None))[0]).abs().max() > 0.1  # it acts
    q32, k32, v32 = (t.float() for t in (q, k, v))
    cal32 = {name: t.float() for name, t in cal.items()}
    out32 = method.forward(q32, k32, v32, None, view(cal32))[0]
    bound = method.error_bound(q32, k32, v32, ref, view(cal32))
    assert bool(((out32.double() - ref).abs() <= bound).all())


def test_the_pieces_rebuild_the_output_under_any_map():
    """c + W x + s b equals SLA's output under (W, b): the fit's model of the method."""
    method = SLA(block_size=8, critical=0.2, marginal=0.6)
    q, k, v = qkv(torch.float32)
    crit, share, x = sla_fit.pieces(method, q, k, v, 0)
    cal = random_map(3, torch.float32)
    w, b = cal[PROJ_W].flatten(0, 1).double(), cal[PROJ_B].flatten(0, 1).double()
    rebuilt = crit + (x[..., None, :] * w[None, :, None]).sum(-1) + share * b[None, :, None]
    out = method.forward(q, k, v, None, view(cal))[0].double()
    torch.testing.assert_close(rebuilt, out, rtol=0, atol=1e-4)
    assert bool((share >= 0).all()) and bool((share <= 1 + 1e-6).all())


def test_the_fit_lowers_the_error_on_its_own_data_and_records_held_out_errors():
    settings = sla_fit.SlaFitSettings(
        model="toy", length=64, windows=2, ridge=1e-3, block_size=8, critical=0.2, marginal=0.6
    )
    data = {i: {0: qkv(torch.float32, seed=10 + i), 1: qkv(torch.float32, seed=20 + i)}
            for i in range(3)}  # fmt: skip
    cal = sla_fit.fit(settings, lambda i: data[i], lambda i: data[2])
    assert cal.method == "sla" and cal.n_layers == 2 and cal.n_kv_heads == N_KV
    assert tuple(cal.tensors[PROJ_W].shape) == (2, N_KV, GROUP, DIM, DIM)
    method = settings.method()
    for layer in (0, 1):
        q, k, v = data[0][layer]
        fitted, plain = sla_fit.layer_errors(method, q, k, v, layer, cal.layer(layer), None)
        assert fitted < plain
    assert len(cal.params["heldout_error_fitted"]) == 2
    assert len(cal.params["heldout_error_training_free"]) == 2


def test_a_head_without_marginal_rows_keeps_the_identity_map():
    """The ridge is scaled by the whole layer: a head whose share is ~0 in every row has no data
    on its map, which stays at the training-free identity instead of fitting noise."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 500, DIM + 1, generator=gen, dtype=torch.float64)
    z[0] *= 1e-4  # head 0: a marginal share of ~1e-4
    r = torch.randn(2, 500, DIM, generator=gen, dtype=torch.float64)
    w, b = sla_fit.solve(z.transpose(-1, -2) @ z, z.transpose(-1, -2) @ r, 1.0)
    assert (w[0] - torch.eye(DIM)).abs().max() < 1e-3 and b[0].abs().max() < 1e-3
    assert (w[1] - torch.eye(DIM)).abs().max() > 1e-2  # the head with data moves


def test_a_calibration_file_runs_through_attention_in_pytorch(tmp_path):
    """A calibrated SLA called through ``attention`` is its PyTorch form under the file's map
    (the C++ pass, which does not apply it, is not taken)."""
    q, k, v = qkv(torch.float32, length=96)
    cal = random_map(5, torch.float32)
    tensors = {name: torch.stack([t, t]) for name, t in cal.items()}  # two layers
    path = Calibration("sla", "toy", 2, N_KV, DIM, tensors).save(tmp_path / "sla.safetensors")
    method = SLA(block_size=8, critical=0.2, marginal=0.6, calibration=str(path))
    out = attention(q, k, v, method=method, layer=1).out
    plain = SLA(block_size=8, critical=0.2, marginal=0.6)
    torch.testing.assert_close(out, plain.forward(q, k, v, None, view(cal, 1))[0], rtol=0, atol=0)


def test_bad_maps_are_refused(tmp_path):
    q, k, v = qkv()
    method = SLA(block_size=8, critical=0.2, marginal=0.6)
    with pytest.raises(ValueError, match="needs both"):
        method.forward(q, k, v, None, view({PROJ_W: identity_map()[PROJ_W]}))
    wrong = {PROJ_W: torch.zeros(N_KV, GROUP, DIM, DIM + 1), PROJ_B: torch.zeros(N_KV, GROUP, DIM)}
    with pytest.raises(ValueError, match="proj_w"):
        method.forward(q, k, v, None, view(wrong))
    with pytest.raises(ValueError, match="calibration"):
        SLA(calibration="")
    other = Calibration("hedgehog", "toy", 1, N_KV, DIM, {"k_proj": torch.zeros(1, N_KV, DIM, 4)})
    path = other.save(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not 'sla'"):
        attention(q.float(), k.float(), v.float(), method=SLA(calibration=str(path)))


@pytest.mark.parametrize(
    "fields, error",
    [(dict(windows=0), ValueError), (dict(ridge=0.0), ValueError), (dict(ridge="1"), TypeError),
     (dict(critical=0.5, marginal=0.6), ValueError), (dict(seed=-1), ValueError)],
)  # fmt: skip
def test_fit_settings_are_checked(fields, error):
    with pytest.raises(error):
        sla_fit.SlaFitSettings(**fields)
