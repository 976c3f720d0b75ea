"""The regularizer registry: spec parsing, errors, optimizer groups and one real train_step per entry."""

import copy
import math
import re

import pytest
import torch
from torch import nn

from robust_enc.data import build_dataset
from robust_enc.errors import UserError
from robust_enc.models import WEIGHT_LAYERS, ModelSpec, build_network
from robust_enc.regularizers import REGULARIZERS, canonical_spec, enc, export_spec, parse_spec, prepare_model, run_name
from robust_enc.train.recipe import build_recipe

WD = 5e-4


@pytest.fixture(scope="module")
def digits_batch():
    dataset, info = build_dataset("digits", "train")
    x = torch.stack([dataset[i][0] for i in range(16)])
    y = torch.tensor([dataset[i][1] for i in range(16)])
    return x, y, info


def _model(info, spec: str = "baseline", name: str = "resnet_tiny") -> nn.Module:
    torch.manual_seed(0)
    model_spec = ModelSpec(name, info.num_classes, info.input_shape, info.mean, info.std, regularizer=spec)
    return prepare_model(build_network(model_spec), spec)


def _step(spec: str, x, y, info, *, seed: int = 1, batch_size: int = 16, weight_decay: float = WD):
    model = _model(info, spec)
    recipe = build_recipe(spec, num_classes=info.num_classes, batch_size=batch_size, weight_decay=weight_decay)
    optimizer = torch.optim.SGD(recipe.param_groups(model), lr=0.1, momentum=0.9)
    torch.manual_seed(seed)
    result = recipe.train_step(model, x, y, optimizer)
    return model, result


# ---------------------------------------------------------------- one real step per registry entry
@pytest.mark.parametrize("name", REGULARIZERS.names())
def test_every_entry_trains_one_step(name, digits_batch):
    x, y, info = digits_batch
    x_before = x.clone()
    model, result = _step(name, x, y, info)
    assert torch.isfinite(torch.tensor(result.loss)) and result.loss > 0
    assert result.n == 16 and 0 <= result.correct <= 16
    assert torch.equal(x, x_before)  # batch transforms never write into the caller's tensor
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("spec", ["l1:coef=0", "gammadecay:coef=0",
                                  "gradnorm:r=0,a=0.8", "sam:rho=0", "noise:sigma=0", "cutout:p=0", "ls:smoothing=0",
                                  "mixup:prob=0", "dropout:p=0", "dropblock:p=0"])
@pytest.mark.parametrize("weight_decay", [WD])
def test_zero_strength_equals_the_baseline(spec, digits_batch, weight_decay):
    """A penalty with weight 0 (or a probe of length 0, a transform that never fires) is the baseline step: the same
    loss, the same updated parameters and the same BN running statistics (gradnorm/SAM restore them)."""
    x, y, info = digits_batch
    base, base_result = _step("baseline", x, y, info, weight_decay=weight_decay)
    model, result = _step(spec, x, y, info, weight_decay=weight_decay)
    assert result.loss == pytest.approx(base_result.loss, rel=1e-6)
    assert result.correct == base_result.correct
    base_state = base.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, base_state[key], rtol=1e-5, atol=1e-7, msg=f"{spec}: {key}")


def test_weissi_at_zero_strength_is_the_baseline_without_weight_decay(digits_batch):
    """WEISSI replaces weight decay on the weights it regularizes: with lambdas 0 it is the baseline at wd 0."""
    test_zero_strength_equals_the_baseline("weissi:lambda1=0,lambda2=0", digits_batch, 0.0)


def _el2_by_hand(w: torch.Tensor, eps: float) -> float:
    """sum over rows i of (n - 1) (sigma_i - eps)^2 + n mu_i^2 (the epsilon-shifted L2 of Li, Chen, Xia, Yang,
    arXiv 1911.05920), in float64."""
    rows = w.detach().double().reshape(w.shape[0], -1)
    n = rows.shape[1]
    return float(((n - 1) * (rows.std(dim=1) - eps).square() + n * rows.mean(dim=1).square()).sum())


@pytest.mark.parametrize("spec,lam,eps", [("enc", WD, 1e-3), ("enc:el2_lambda=0.01,el2_eps=0.05", 0.01, 0.05)])
def test_enc_step_loss_is_cross_entropy_plus_shifted_l2_on_raw_weights(digits_batch, spec, lam, eps):
    x, y, info = digits_batch
    model = _model(info, spec)
    raw = [m.parametrizations.weight.original for _, m, _ in enc.enc_layers(model)]
    assert raw
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(model(x), y))  # train mode, as the step's forward
    term = 0.5 * lam * sum(_el2_by_hand(w, eps) for w in raw)
    assert term > 1e-4 * expected  # large enough for the comparison below to see it
    _, result = _step(spec, x, y, info)
    assert result.loss == pytest.approx(expected + term, rel=1e-5)


def test_penalties_add_their_terms(digits_batch):
    """Non-zero strengths change the loss by exactly the penalty (same data, same weights)."""
    x, y, info = digits_batch
    _, base = _step("baseline", x, y, info)
    model = _model(info)
    coef = 1e-3
    l1 = coef * sum(float(m.weight.detach().abs().sum()) for m in model.modules() if isinstance(m, WEIGHT_LAYERS))
    _, result = _step(f"l1:coef={coef}", x, y, info)
    assert result.loss == pytest.approx(base.loss + l1, rel=1e-5)
    gammas = 0.5 * coef * sum(float(m.weight.detach().pow(2).sum()) for m in model.modules()
                              if isinstance(m, nn.BatchNorm2d))
    _, result = _step(f"gammadecay:coef={coef}", x, y, info)
    assert result.loss == pytest.approx(base.loss + gammas, rel=1e-5)
    lambda1, lambda2 = 1e-2, 1e-3  # WEISSI: lambda1 sum log ||W_l|| + lambda2 sum || W_l / ||W_l|| ||_1
    weights = [m.weight.detach().double() for m in model.modules() if isinstance(m, WEIGHT_LAYERS)]
    weissi = sum(lambda1 * math.log(float(w.norm())) + lambda2 * float((w / w.norm()).abs().sum()) for w in weights)
    _, result = _step(f"weissi:lambda1={lambda1},lambda2={lambda2}", x, y, info)
    assert result.loss == pytest.approx(base.loss + weissi, rel=1e-5)


def test_sharpness_step_mixes_the_two_gradients():
    """gradnorm's update is (1 - a) g(theta) + a g(theta + r g/||g||), computed here by hand on a linear model."""
    torch.manual_seed(0)
    x, y = torch.rand(12, 1, 4, 4), torch.randint(0, 3, (12,))
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    r, a = 0.3, 0.8
    theta = [p.detach().clone() for p in net.parameters()]

    def grads_at(params):
        probe = copy.deepcopy(net)
        with torch.no_grad():
            for p, value in zip(probe.parameters(), params):
                p.copy_(value)
        nn.functional.cross_entropy(probe(x), y).backward()
        return [p.grad for p in probe.parameters()]

    g1 = grads_at(theta)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in g1]))
    g2 = grads_at([t + r * g / norm for t, g in zip(theta, g1)])
    expected = [t - ((1 - a) * u + a * v) for t, u, v in zip(theta, g1, g2)]
    recipe = build_recipe(f"gradnorm:r={r},a={a}", num_classes=3, batch_size=12, weight_decay=0.0)
    optimizer = torch.optim.SGD(recipe.param_groups(net), lr=1.0)
    recipe.train_step(net, x, y, optimizer)
    for p, e in zip(net.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)


@pytest.mark.parametrize("spec", ["baseline", "enc+sam", "enc:alpha=learnable+cutmix+ls"])
def test_amp_path_with_a_scaler(spec, digits_batch):
    x, y, info = digits_batch
    model = _model(info, spec)
    recipe = build_recipe(spec, num_classes=10, batch_size=16, weight_decay=WD)
    optimizer = torch.optim.SGD(recipe.param_groups(model), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    result = recipe.train_step(model, x, y, optimizer, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
                               scaler=scaler)
    assert torch.isfinite(torch.tensor(result.loss))
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------- optimizer groups
def _group_names(model: nn.Module, groups: list[dict]) -> dict[str, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}


def test_decay_only_on_conv_and_linear_weights(digits_batch):
    _, _, info = digits_batch
    model = _model(info)
    groups = build_recipe("baseline", num_classes=10, batch_size=8, weight_decay=WD).param_groups(model)
    by_name = _group_names(model, groups)
    expected = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert by_name["decay"] == expected
    assert by_name["no_decay"] == {n for n, _ in model.named_parameters()} - expected
    assert all(n.endswith(".bias") or ".bn" in n or "shortcut.1" in n for n in by_name["no_decay"])
    assert {g["name"]: g["weight_decay"] for g in groups} == {"decay": WD, "no_decay": 0.0}
    torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # a plain SGD takes the groups as they are


def test_enc_raw_weights_get_el2_instead_of_decay(digits_batch):
    _, _, info = digits_batch
    model = _model(info, "enc:classifier=false")
    by_name = _group_names(model, build_recipe("enc", num_classes=10, batch_size=8, weight_decay=WD)
                           .param_groups(model))
    assert by_name["decay"] == {"net.fc.weight"}  # the plain classifier keeps ordinary decay
    raw = {n for n in by_name["no_decay"] if n.endswith("parametrizations.weight.original")}
    assert len(raw) == len(list(enc.enc_layers(model)))


def test_weissi_weights_get_no_plain_decay(digits_batch):
    """L2 is not scale-shift invariant: WEISSI's weights leave the decay group (ENC's raw weights too when combined)."""
    _, _, info = digits_batch
    for spec in ("weissi", "enc:classifier=false+weissi"):
        model = _model(info, spec)
        groups = build_recipe(spec, num_classes=10, batch_size=8, weight_decay=WD).param_groups(model)
        assert [g["name"] for g in groups] == ["no_decay"]  # nothing left to decay (BN and biases never are)
        raw = {id(enc.raw_weight(m)) for m in model.modules() if isinstance(m, WEIGHT_LAYERS)}
        assert len(raw) == 10 and raw <= {id(p) for p in groups[0]["params"]}  # 9 convs + the classifier


def test_wn_decays_directions_not_gains(digits_batch):
    _, _, info = digits_batch
    model = _model(info, "wn")
    by_name = _group_names(model, build_recipe("wn", num_classes=10, batch_size=8, weight_decay=WD)
                           .param_groups(model))
    assert by_name["decay"] and all(n.endswith("original1") for n in by_name["decay"])
    assert any(n.endswith("original0") for n in by_name["no_decay"])


# ---------------------------------------------------------------- spec text
@pytest.mark.parametrize("name", REGULARIZERS.names())
def test_canonical_spec_round_trips(name):
    canonical = canonical_spec(name)
    assert canonical_spec(canonical) == canonical
    assert [e.settings() for e in parse_spec(canonical)] == [e.settings() for e in parse_spec(name)]
    assert re.fullmatch(r"[A-Za-z0-9._+=-]+", run_name(canonical))
    assert run_name(canonical) == name  # defaults are not shown


def test_specs_are_ordered_and_named():
    assert canonical_spec("ls+cutmix+enc") == canonical_spec("enc+cutmix+ls")
    assert canonical_spec("enc+cutmix+ls") == ("enc:variant=eq22,alpha=1.0,classifier=true,el2_eps=0.001,"
                                               "el2_lambda=wd+cutmix:alpha=1.0,prob=1.0+ls:smoothing=0.1")
    assert run_name("ls+enc+cutmix") == "enc+cutmix+ls"
    assert run_name("enc:alpha=0.5,variant=eq21") == "enc_variant-eq21_alpha-0.5"
    assert run_name("enc:alpha=learnable") == "enc_alpha-learnable"
    assert run_name("baseline+cutmix") == "cutmix" and run_name("baseline") == "baseline"
    assert canonical_spec("l1:coef=1e+3") == "l1:coef=1000.0"  # '+' inside a number is not a separator
    assert canonical_spec(" enc : alpha = 2 ") == canonical_spec("enc:alpha=2.0")
    assert export_spec("enc+dropout+cutmix") == canonical_spec("dropout+cutmix")
    assert export_spec("ws") == "baseline"


@pytest.mark.parametrize(("spec", "message"), [
    ("encc", "Did you mean 'enc'"),
    ("", "empty regularizer spec"),
    ("enc+", "empty regularizer name"),
    ("enc:alpah=1", "Did you mean 'alpha'"),
    ("enc:alpha", "key=value"),
    ("enc:alpha=big", "alpha='big' must be a number or learnable"),
    ("enc:alpha=0", "alpha=0.0 is out of range"),
    ("enc:alpha=-1", "out of range"),
    ("enc:variant=eq24", "one of eq20, eq21, eq22, eq23"),
    ("enc:classifier=maybe", "true or false"),
    ("dropout:p=1", r"must lie in \[0, 1\)"),
    ("ls:smoothing=nan", "finite number"),
    ("enc+wn", "cannot be combined"),
    ("ws+enc", "cannot be combined"),
    ("gradnorm+sam", "cannot be combined"),
    ("cutmix+cutmix:alpha=0.5", "given twice"),
    ("enc:alpha=1,alpha=2", "given twice"),
])
def test_bad_specs_raise_user_errors(spec, message):
    with pytest.raises(UserError, match=message):
        canonical_spec(spec)


def test_build_recipe_checks_the_run(digits_batch):
    with pytest.raises(UserError, match="batch size of at least 2"):
        build_recipe("enc+cutmix", num_classes=10, batch_size=1, weight_decay=WD)
    with pytest.raises(UserError, match="same prob"):
        build_recipe("mixup:prob=0.5+cutmix", num_classes=10, batch_size=8, weight_decay=WD)
    with pytest.raises(UserError, match="weight decay"):
        build_recipe("baseline", num_classes=10, batch_size=8, weight_decay=-1.0)
    with pytest.raises(UserError, match="dropblock needs a ResNet-style model"):
        prepare_model(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), "dropblock")


# ---------------------------------------------------------------- batch transforms and hooks
def test_mixed_targets_carry_label_smoothing():
    recipe = build_recipe("cutmix+ls", num_classes=4, batch_size=7, weight_decay=WD)
    x, y = torch.rand(7, 3, 8, 8), torch.randint(0, 4, (7,))  # odd batch: the last image stays unmixed
    x_out, target = recipe.transform_batch(x, y)
    assert x_out.shape == x.shape and target.shape == (7, 4)
    torch.testing.assert_close(target.sum(1), torch.ones(7))
    assert float(target.min()) >= 0.1 / 4 - 1e-6
    assert torch.equal(x_out[-1], x[-1]) and float(target[-1, y[-1]]) == pytest.approx(0.9 + 0.1 / 4)


def test_cutout_masks_one_clipped_square():
    x = torch.rand(64, 2, 10, 10) * 0.5 + 0.5  # every pixel >= 0.5, the fill is 0
    (entry,) = parse_spec("cutout:size=0.4,fill=0")
    out = entry.transform(x)
    masked = (out == 0).all(dim=1)  # (B, H, W), same patch in every channel
    counts = masked.flatten(1).sum(1)
    assert counts.max() == 16 and counts.min() >= 4  # a 4x4 square, clipped at the borders
    rows, cols = masked.any(2), masked.any(1)
    assert torch.equal(rows.sum(1) * cols.sum(1), counts)  # a rectangle, not scattered pixels
    assert torch.equal(out[~masked[:, None].expand_as(out)], x[~masked[:, None].expand_as(x)])


def test_feature_hooks_keep_keys_and_only_act_in_training(digits_batch):
    x, _, info = digits_batch
    plain = _model(info)
    hooked = _model(info, "dropout:p=0.5+dropblock:p=0.5")
    assert list(plain.state_dict()) == list(hooked.state_dict())
    hooked.load_state_dict(plain.state_dict())
    plain.eval(), hooked.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), hooked(x))
        hooked.train()
        assert not torch.equal(hooked(x), hooked(x))  # fresh masks each call


@pytest.mark.parametrize("arch,site", [("resnet18", "bn1"), ("resnet50", "bn2"), ("seresnet50", "bn2")])
def test_dropblock_sits_where_timm_puts_it(arch, site):
    """timm's ResNet blocks apply drop_block after bn1 (basic block) / bn2 (bottleneck), in the last two stages."""
    net = build_network(ModelSpec(arch, 5, (3, 32, 32), (0.5,) * 3, (0.25,) * 3))
    prepare_model(net, "dropblock")
    hooked = {n for n, m in net.named_modules() if m._forward_hooks}
    blocks = {s: len(getattr(net.net, f"layer{s}")) for s in (3, 4)}
    assert hooked == {f"net.layer{s}.{i}.{site}" for s, count in blocks.items() for i in range(count)}
    sizes = {n.split(".")[1]: next(iter(m._forward_hooks.values())).block.block_size
             for n, m in net.named_modules() if m._forward_hooks}
    assert sizes == {"layer3": 5, "layer4": 3}


class _DropAll(nn.Module):
    """Stands in for DropBlock2d at drop probability 1: the whole feature map dropped."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


@pytest.mark.parametrize("arch", ["resnet_tiny", "resnet50"])
def test_dropblock_leaves_the_identity_path(arch):
    """With everything dropped at the DropBlock site the residual branch gives BN's shift (0 for fresh BN layers),
    so each block outputs relu(shortcut(x)): the identity path is kept (dropping the block output gave zeros)."""
    torch.manual_seed(0)
    shape = (1, 8, 8) if arch == "resnet_tiny" else (3, 32, 32)
    model = build_network(ModelSpec(arch, 5, shape, (0.5,) * shape[0], (0.25,) * shape[0]))
    prepare_model(model, "dropblock:p=0.5")
    hooks = [h for m in model.modules() for h in m._forward_hooks.values()]
    assert hooks
    for hook in hooks:
        hook.block = _DropAll()
    stages = [model.net.layers[-1]] if arch == "resnet_tiny" else [model.net.layer3[1], model.net.layer4[0]]
    model.eval()  # fresh BN statistics (mean 0, var 1) and affine (1, 0): BN of zeros is zero
    for block in stages:
        x = torch.rand(2, block.conv1.in_channels, 4, 4)
        shortcut = getattr(block, "shortcut", None) or block.downsample or nn.Identity()
        with torch.no_grad():
            expected = torch.relu(shortcut(x))
            assert float(expected.abs().sum()) > 0
            torch.testing.assert_close(block(x), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["baseline", "enc+cutmix+ls", "enc:alpha=learnable+sam", "ws+dropblock"])
def test_cuda_fp16_step(spec, digits_batch):
    x, y, info = digits_batch
    model = _model(info, spec).cuda()
    recipe = build_recipe(spec, num_classes=10, batch_size=16, weight_decay=WD)
    optimizer = torch.optim.SGD(recipe.param_groups(model), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    for _ in range(3):
        result = recipe.train_step(model, x.cuda(), y.cuda(), optimizer,
                                   autocast=lambda: torch.autocast("cuda", dtype=torch.float16), scaler=scaler)
        assert torch.isfinite(torch.tensor(result.loss))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for _, module, p in enc.enc_layers(model):
        alpha = float(torch.as_tensor(p.current_alpha()).detach())
        assert float(module.weight.detach().float().pow(2).sum()) == pytest.approx(alpha, rel=1e-3)
