"""ENC (paper eq. 20-23), WN, WS, baking and the epsilon-shifted L2: identities checked on real models."""

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from robust_enc.checkpoint import load_state_strict
from robust_enc.models import ModelSpec, build_network, classifier_of
from robust_enc.train import enc
from robust_enc.train.regularizers import build_recipe, export_spec, prepare_model

# A representative slice of the zoo: CIFAR ResNets, torchvision ResNet / grouped ResNeXt / DenseNet, timm SE-ResNet and
# a timm model with depthwise convolutions. Small num_classes; built once per module (big ones take ~1 s each).
ARCHS = ["resnet_tiny", "resnet20", "resnet18", "resnext50_32x4d", "densenet201", "seresnet50",
         "timm:mobilenetv3_small_050"]
_BUILT: dict[str, nn.Module] = {}


def _spec(name: str, regularizer: str = "baseline") -> ModelSpec:
    shape = (1, 8, 8) if name == "resnet_tiny" else (3, 32, 32)
    return ModelSpec(name, 5, shape, (0.5,) * shape[0], (0.25,) * shape[0], regularizer=regularizer)


def _network(name: str) -> nn.Module:
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = build_network(_spec(name))
    return copy.deepcopy(_BUILT[name])


def _layer_count(model: nn.Module) -> int:
    return sum(isinstance(m, enc.LAYER_TYPES) for m in model.modules())


_ENC_APPLIED: dict[str, nn.Module] = {}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", enc.VARIANTS)
def test_enc_invariant_every_layer_every_variant(arch, variant):
    # apply_enc once per architecture (registering ~200 parametrizations takes seconds on the big ones), then put
    # this variant's ENCWeight into every layer's parametrization list: the forward path is the registered one.
    if arch not in _ENC_APPLIED:
        _ENC_APPLIED[arch] = enc.apply_enc(_network(arch))
    model = _ENC_APPLIED[arch]
    layers = list(enc.enc_layers(model))
    assert len(layers) == _layer_count(model) > 0  # every conv/linear layer, the classifier included
    for _, module, _ in layers:
        module.parametrizations.weight[0] = enc.ENCWeight(variant, 0.7)
    with torch.no_grad():
        for name, module, parametrization in enc.enc_layers(model):
            assert parametrization.variant == variant
            sq_norm = float(module.weight.double().pow(2).sum())
            assert sq_norm == pytest.approx(0.7, rel=1e-4), name


def test_zoo_slice_covers_grouped_and_depthwise_convs():
    """The invariant test above is only meaningful for grouped/depthwise convs if the slice contains them."""
    groups = {arch: max((m.groups for m in _network(arch).modules() if isinstance(m, nn.Conv2d)), default=1)
              for arch in ("resnext50_32x4d", "timm:mobilenetv3_small_050")}
    assert groups["resnext50_32x4d"] == 32
    depthwise = [m for m in _network("timm:mobilenetv3_small_050").modules()
                 if isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels > 1]
    assert depthwise


@pytest.mark.parametrize("variant", enc.VARIANTS)
def test_enc_rows_and_centring_follow_the_equations(variant):
    w = torch.randn(6, 4, 3, 3)
    w_hat = enc.ENCWeight(variant, 2.0)(w)
    rows = w_hat.reshape(6, -1)
    if variant in ("eq21", "eq22"):  # each of the m_i = 6 rows carries alpha / m_i
        torch.testing.assert_close(rows.pow(2).sum(1), torch.full((6,), 2.0 / 6))
    if variant == "eq22":
        torch.testing.assert_close(rows.mean(1), torch.zeros(6), atol=1e-6, rtol=0)
    if variant == "eq23":
        assert abs(float(w_hat.mean())) < 1e-6
    if variant in ("eq20", "eq21"):  # no centring: W_hat is a positive rescaling of W (per tensor / per row)
        assert torch.all(torch.sign(w_hat) == torch.sign(w))


def test_enc_on_rows_of_length_one_stays_finite():
    """A centred row of one entry is zero: eq. 22/23 fall back to their uncentred forms and keep the invariant."""
    layer = enc.apply_enc(nn.Sequential(nn.Linear(1, 4)), variant="eq22")[0]
    assert torch.isfinite(layer.weight).all()
    assert float(layer.weight.detach().pow(2).sum()) == pytest.approx(1.0, rel=1e-5)


def test_learnable_alpha_gets_gradients_and_keeps_the_invariant():
    model = enc.apply_enc(_network("resnet_tiny"), alpha=None)
    alphas = [p.log_alpha for _, _, p in enc.enc_layers(model)]
    assert all(isinstance(a, nn.Parameter) for a in alphas)
    assert {id(a) for a in alphas} <= {id(p) for p in model.parameters()}
    with torch.no_grad():
        for a in alphas:
            a.uniform_(-1, 1)
    for _, module, p in enc.enc_layers(model):
        assert float(module.weight.detach().pow(2).sum()) == pytest.approx(float(p.log_alpha.detach().exp()), rel=1e-4)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 5, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(a.grad is not None and torch.isfinite(a.grad) for a in alphas)
    # BN after a conv makes the loss nearly scale-invariant there; the classifier's alpha scales the logits directly.
    head = classifier_of(model)
    assert float(head.parametrizations.weight[0].log_alpha.grad.abs()) > 0


def test_classifier_can_be_left_out():
    model = enc.apply_enc(_network("resnet20"), classifier=False)
    head = classifier_of(model)
    assert not parametrize.is_parametrized(head)
    assert len(list(enc.enc_layers(model))) == _layer_count(model) - 1


def test_optimizer_sees_the_raw_weights():
    torch.manual_seed(0)
    model = prepare_model(_network("resnet_tiny"), "enc")
    recipe = build_recipe("enc", num_classes=5, batch_size=8, weight_decay=5e-4)
    optimizer = torch.optim.SGD(recipe.param_groups(model), lr=0.5, momentum=0.9)
    conv = model.net.conv1
    raw = conv.parametrizations.weight.original
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(raw) in optimized and id(conv.weight) not in optimized
    before_raw, before_w = raw.detach().clone(), conv.weight.detach().clone()
    recipe.train_step(model, torch.rand(8, 1, 8, 8), torch.randint(0, 5, (8,)), optimizer)
    assert not torch.equal(raw, before_raw)  # the raw weight moved ...
    assert not torch.equal(conv.weight, before_w)  # ... the normalized one follows it ...
    assert float(conv.weight.detach().pow(2).sum()) == pytest.approx(1.0, rel=1e-5)  # ... and keeps its norm


def test_wn_and_ws_normalize_rows():
    wn = enc.apply_wn(_network("resnet_tiny"))
    conv = wn.net.layers[1].conv1
    g = conv.parametrizations.weight.original0
    torch.testing.assert_close(conv.weight, conv.parametrizations.weight.original1)  # g starts at ||v_j||
    with torch.no_grad():
        g.mul_(3.0)
    torch.testing.assert_close(conv.weight.flatten(1).norm(dim=1), g.flatten())
    ws = enc.apply_ws(_network("resnet_tiny"), eps=1e-5)
    conv = ws.net.layers[1].conv1
    rows = conv.weight.detach().flatten(1)
    raw_var = conv.parametrizations.weight.original.detach().flatten(1).var(1, correction=0)
    torch.testing.assert_close(rows.mean(1), torch.zeros(len(rows)), atol=1e-6, rtol=0)
    torch.testing.assert_close(rows.var(1, correction=0), raw_var / (raw_var + 1e-5))  # unit variance up to eps
    assert not parametrize.is_parametrized(classifier_of(ws))  # WS leaves the classifier by default


def test_a_weight_gets_one_normalization_only():
    model = enc.apply_enc(_network("resnet_tiny"))
    with pytest.raises(ValueError, match="already has a weight parametrization"):
        enc.apply_ws(model)


@pytest.mark.parametrize("spec", ["enc", "enc:variant=eq20,alpha=learnable,classifier=false", "wn", "ws",
                                  "enc:variant=eq21+dropout+dropblock+cutmix"])
def test_baked_model_matches_and_loads_into_the_export_spec(spec):
    torch.manual_seed(0)
    model_spec = _spec("resnet_tiny", spec)
    model = prepare_model(build_network(model_spec), spec)
    recipe = build_recipe(spec, num_classes=5, batch_size=16, weight_decay=5e-4)
    optimizer = torch.optim.SGD(recipe.param_groups(model), lr=0.5, momentum=0.9)
    for _ in range(2):  # move raw weights, WN gains and learnable alphas away from their initial values
        recipe.train_step(model, torch.rand(16, 1, 8, 8), torch.randint(0, 5, (16,)), optimizer)
    x = torch.rand(10, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        baked = enc.bake_model(model)
        assert not list(enc.parametrized_layers(baked))
        assert torch.equal(baked(x), expected)
    exported = dataclasses.replace(model_spec, regularizer=export_spec(spec))
    plain = prepare_model(build_network(exported), exported.regularizer).eval()
    assert set(plain.state_dict()) == set(baked.state_dict())
    load_state_strict(plain, baked.state_dict(), "baked")
    with torch.no_grad():
        assert torch.equal(plain(x), expected)


# ---------------------------------------------------------------- epsilon-shifted L2
@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (5, 7), (4, 1, 3, 3)])
def test_el2_gradient_is_the_authors_update(shape):
    torch.manual_seed(1)
    w = (torch.randn(shape, dtype=torch.float64) * 0.1 + 0.02).requires_grad_()
    lam, eps = 3e-2, 5e-2
    (0.5 * lam * enc.el2_penalty(w, eps)).backward()
    rows = w.detach().reshape(shape[0], -1)
    mu = rows.mean(1, keepdim=True)
    sigma = rows.std(1, keepdim=True)  # unbiased, as the authors' code
    expected = lam * ((1 - eps / sigma) * (rows - mu) + mu)
    torch.testing.assert_close(w.grad.reshape(shape[0], -1), expected)


def test_el2_with_zero_eps_is_plain_l2():
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    assert float(enc.el2_penalty(w, 0.0)) == pytest.approx(float(w.pow(2).sum()), rel=1e-9)


def test_el2_loss_covers_enc_layers_only():
    model = enc.apply_enc(_network("resnet_tiny"), classifier=False)
    expected = sum(float(enc.el2_penalty(enc.raw_weight(m).detach(), 1e-3)) for _, m, _ in enc.enc_layers(model))
    assert float(enc.el2_loss(model, lam=2.0, eps=1e-3).detach()) == pytest.approx(expected, rel=1e-5)
    assert float(enc.el2_loss(_network("resnet_tiny"), lam=2.0)) == 0.0
