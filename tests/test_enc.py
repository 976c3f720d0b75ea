"""ENC (paper eq. 20-23), WN, WS, baking and the epsilon-shifted L2: identities checked on real models."""

import contextlib
import copy
import dataclasses
import functools
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from robust_enc.checkpoint import load_state_strict
from robust_enc.models import MODELS, WEIGHT_LAYERS, ModelSpec, build_network, classifier_of
from robust_enc.regularizers import enc, export_spec, prepare_model, rownorm
from robust_enc.train.recipe import build_recipe

# Every model registry name (as test_foundation's ZOO) plus a timm model with depthwise convolutions, each built at its
# smallest input with few classes. Built once per module: the largest (resnext101_32x8d) takes ~2 s on 2 busy cores,
# all of them together ~15 s, so none is marked slow.
ARCHS = [n for n in MODELS.names() if n != "timm"] + ["timm:mobilenetv3_small_050"]
_BUILT: dict[str, nn.Module] = {}


def _spec(name: str, regularizer: str = "baseline") -> ModelSpec:
    size = MODELS.lookup(name)[0].meta.get("min_size", 32)
    shape = (1, 8, 8) if name == "resnet_tiny" else (3, size, size)
    return ModelSpec(name, 5, shape, (0.5,) * shape[0], (0.25,) * shape[0], regularizer=regularizer)


def _network(name: str) -> nn.Module:
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = build_network(_spec(name))
    return copy.deepcopy(_BUILT[name])


def _layer_count(model: nn.Module) -> int:
    return sum(isinstance(m, WEIGHT_LAYERS) for m in model.modules())




@pytest.mark.parametrize("arch", ARCHS)
def test_enc_invariant_every_layer_every_variant(arch, one_thread):
    # apply_enc once per architecture (registering ~300 parametrizations takes a second on the big ones), then put each
    # variant's ENCWeight into every layer's parametrization list: the forward path is the registered one. The model
    # is built here, not cached: the biggest ones hold ~90M parameters.
    torch.manual_seed(0)
    model = enc.apply_enc(build_network(_spec(arch)))
    layers = list(enc.enc_layers(model))
    assert len(layers) == _layer_count(model) > 0  # every conv/linear layer, the classifier included
    for variant in enc.VARIANTS:
        for _, module, _ in layers:
            module.parametrizations.weight[0] = enc.ENCWeight(variant, 0.7)
        with torch.no_grad():
            for name, module, parametrization in enc.enc_layers(model):
                assert parametrization.variant == variant
                sq_norm = float(module.weight.double().pow(2).sum())
                assert sq_norm == pytest.approx(0.7, rel=1e-4), f"{variant} {name}"


def test_zoo_slice_covers_grouped_and_depthwise_convs():
    """The invariant test above covers every registry name, and grouped and depthwise convs."""
    assert set(MODELS.names()) - {"timm"} <= set(ARCHS)
    groups = {arch: max((m.groups for m in _network(arch).modules() if isinstance(m, nn.Conv2d)), default=1)
              for arch in ("resnext50_32x4d", "timm:mobilenetv3_small_050")}
    assert groups["resnext50_32x4d"] == 32
    depthwise = [m for m in _network("timm:mobilenetv3_small_050").modules()
                 if isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels > 1]
    assert depthwise


def _closed_form(w: torch.Tensor, variant: str, alpha: float) -> torch.Tensor:
    """Paper eq. 20-23 written out directly (rows = output units, m = their number)."""
    rows = w.reshape(w.shape[0], -1)
    m = rows.shape[0]
    if variant == "eq20":
        out = alpha ** 0.5 * rows / rows.norm()
    elif variant == "eq21":
        out = (alpha / m) ** 0.5 * rows / rows.norm(dim=1, keepdim=True)
    elif variant == "eq22":
        c = rows - rows.mean(dim=1, keepdim=True)
        out = (alpha / m) ** 0.5 * c / c.norm(dim=1, keepdim=True)
    else:  # eq23
        c = rows - rows.mean()
        out = alpha ** 0.5 * c / c.norm()
    return out.reshape(w.shape)


@pytest.mark.parametrize("variant", enc.VARIANTS)
@pytest.mark.parametrize("layer", [nn.Conv2d(8, 6, 3, groups=2), nn.Conv2d(4, 4, 3, groups=4), nn.Linear(7, 5)],
                         ids=["conv-groups2", "depthwise", "linear"])
def test_enc_variants_equal_their_closed_forms(variant, layer):
    layer = copy.deepcopy(layer)
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight) * 0.3 + 0.1)  # a non-zero mean, so centring matters
    raw = layer.weight.detach().double().clone()
    enc.apply_enc(nn.Sequential(layer), variant=variant, alpha=2.0)
    expected = _closed_form(raw, variant, 2.0)
    torch.testing.assert_close(layer.weight.detach().double(), expected, rtol=1e-5, atol=1e-6)
    for other in set(enc.VARIANTS) - {variant}:  # the variants differ on these weights: a swap would be caught
        assert not torch.allclose(expected, _closed_form(raw, other, 2.0), rtol=1e-3, atol=1e-4), other


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
    # a float64 network gets float64 alphas: a float32 one would round sqrt(alpha) in every float64 forward pass
    wide = enc.apply_enc(_network("resnet_tiny").double(), alpha=None)
    assert {p.log_alpha.dtype for _, _, p in enc.enc_layers(wide)} == {torch.float64}


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


# ---------------------------------------------------------------- the fused step: same numbers, fewer passes
def _parametrizations() -> list[nn.Module]:
    return [enc.ENCWeight(v, a) for v in enc.VARIANTS for a in (0.7, None)] + [enc.WSWeight(1e-5)]


def _normalize(p: nn.Module, flat: torch.Tensor, fn=rownorm.normalize_rows):
    """Call ``fn`` (fused or plain) the way ``p.forward`` does."""
    if isinstance(p, enc.WSWeight):
        return fn(flat, p._scale, "row")
    centre = ("row" if p.per_row else "all") if p.centred else "none"
    params = (p.log_alpha,) if p.log_alpha is not None else ()
    return fn(flat, functools.partial(p._scale, p.centred), centre, *params)


@pytest.mark.parametrize("p", _parametrizations(), ids=lambda p: type(p).__name__ + "-" + p.extra_repr())
def test_fused_normalization_backward_is_autograds(p):
    """The hand-written backward against finite differences (gradcheck) and against autograd through the plain ops,
    with gradients arriving through W_hat and through both row statistics (as ENC's L2 term sends them)."""
    torch.manual_seed(3)
    p = copy.deepcopy(p).double()
    if getattr(p, "log_alpha", None) is not None:
        with torch.no_grad():
            p.log_alpha.fill_(0.3)
    small = (torch.randn(4, 5, dtype=torch.float64) * 0.5 + 0.2).requires_grad_()
    assert torch.autograd.gradcheck(lambda w: _normalize(p, w), (small,))
    flat = (torch.randn(6, 27, dtype=torch.float64) * 0.3 + 0.1).requires_grad_()
    upstream = [torch.randn(6, 27, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64),
                torch.randn(6, 1, dtype=torch.float64)]
    inputs = [flat, *p.parameters()]
    grads = {}
    for name, fn in (("fused", rownorm.normalize_rows), ("plain", rownorm.normalize_rows_plain)):
        outputs = _normalize(p, flat, fn)
        grads[name] = torch.autograd.grad(sum((o * u).sum() for o, u in zip(outputs, upstream)), inputs)
        if name == "fused":
            fused_out = [o.detach() for o in outputs]
    for got, want in zip(grads["fused"], grads["plain"]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for got, want in zip(fused_out, _normalize(p, flat, rownorm.normalize_rows_plain)):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-14)


def test_float32_keeps_alpha_on_the_largest_layer_of_the_zoo():
    """No float64 in the whole-tensor norms (eq. 20/23): row norms summed over the rows keep ||W_hat||_F^2 = alpha
    within 1e-6 relative on the zoo's largest weight, where one float32 run over all entries does not."""
    shapes = []
    for arch in ARCHS:
        with torch.device("meta"):  # shapes only: no memory, no init cost
            net = build_network(_spec(arch))
        shapes += [tuple(m.weight.shape) for m in net.modules() if isinstance(m, WEIGHT_LAYERS)]
    shape = max(shapes, key=math.prod)
    assert math.prod(shape) > 4_000_000  # wide_resnet50_2's 1024x1024x3x3 convolutions
    torch.manual_seed(0)
    weight = torch.randn(shape) * 0.02 + 0.001  # a trained layer's scale, with a mean for the centred variants
    for variant in enc.VARIANTS:
        with torch.no_grad():
            w_hat = enc.ENCWeight(variant, 0.7)(weight)
        assert w_hat.dtype == torch.float32
        sq_norm = float(w_hat.double().square().sum())
        assert abs(sq_norm - 0.7) / 0.7 < 1e-6, variant


def test_step_weights_share_the_row_statistics_and_drop_them():
    """Inside a training step the L2 term reads the forward pass's row statistics (the same value as from the raw
    weights); after it no layer holds graph tensors (the model deep-copies)."""
    model = prepare_model(_network("resnet_tiny"), "enc")
    x = torch.rand(8, 1, 8, 8)
    expected = float(enc.el2_loss(model, lam=2.0).detach())  # outside a step: computed from the raw weights
    with enc.step_weights(model):
        model(x)
        assert all(p.row_stats is not None for _, _, p in enc.enc_layers(model))
        assert float(enc.el2_loss(model, lam=2.0).detach()) == pytest.approx(expected, rel=1e-6)
    assert all(p.row_stats is None and not p.recording for _, _, p in enc.enc_layers(model))
    copy.deepcopy(model)


@pytest.mark.parametrize("spec", ["enc", "enc:variant=eq21,alpha=0.7", "ws"])
def test_step_batch_gives_the_per_layer_weights_and_gradients(spec):
    """Inside step_weights the row-wise layers are normalized in one batch: the same W_hat, L2 term and gradients
    (raw weights, through W_hat and the L2 term's row statistics) as each layer's own function, which the test
    above checks against autograd; float64, to 1e-10. And the batch's backward against finite differences."""
    torch.manual_seed(0)
    model = prepare_model(_network("resnet_tiny"), spec).double()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    raw = [enc.raw_weight(m) for _, m in enc.parametrized_layers(model)]
    results = {}
    for batched in (False, True):
        with enc.step_weights(model) if batched else contextlib.nullcontext():
            loss = model(x).square().sum() + enc.el2_loss(model, lam=0.3)
            w_hats = [m.weight.detach().clone() for _, m in enc.parametrized_layers(model)]
            if batched:
                assert all(p.batch is not None and p.batch.outputs is not None for _, m in
                           enc.parametrized_layers(model) for p in m.parametrizations.weight)
        results[batched] = (w_hats, loss.detach(), torch.autograd.grad(loss, raw))
    for got, want in zip(*(results[True][0], results[False][0])):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-10, atol=1e-12)
    for got, want in zip(results[True][2], results[False][2]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert all(p.batch is None for _, m in enc.parametrized_layers(model) for p in m.parametrizations.weight)

    # two small layers of different row lengths, gradients arriving through W_hat and the statistics
    key = ("ws", 1e-5) if spec == "ws" else ("enc", spec == "enc")
    weights = [(torch.randn(3, 2, 2, dtype=torch.float64) * 0.5 + 0.2).requires_grad_(),
               (torch.randn(2, 5, dtype=torch.float64) * 0.3 - 0.1).requires_grad_()]
    n = torch.tensor([[4.0]] * 3 + [[5.0]] * 2, dtype=torch.float64)
    gain = torch.tensor([[math.sqrt(0.7 / 3)]] * 3 + [[math.sqrt(0.7 / 2)]] * 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *w: rownorm.BatchedRowNormalize.apply(key, (n, gain), *w), weights)
