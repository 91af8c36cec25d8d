"""The recipes' models as their own build functions make them: any torchvision classifier trains one
step (auxiliary heads included), and weights come from a local file, checked key by key, in place
before the plan's norm policy converts BatchNorm. No Ray: the recipe's build path, the loop's loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from launcher import weights
from launcher.cli import load
from launcher.config import Config, ConfigError
from launcher.launch import build_plan
from launcher.step import normalized_loss
from launcher.worker import convert_norm
from recipes import coco, imagenet

# The smallest training input each accepts here (torchvision 0.2x, measured): googlenet's pooling stops
# below 15 px; inception_v3's auxiliary head needs its 17x17 grid, i.e. 299 px (its main path takes 75);
# vit_b_16 is built for the crop (one 16-px patch).
SMALLEST = {
    "googlenet": 15,
    "inception_v3": 299,
    "vit_b_16": 16,
    "convnext_tiny": 32,
    "mobilenet_v3_small": 8,
    "efficientnet_b0": 8,
}
AUX_HEADS = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def classifier_config(model: str, crop: int, *extra: str):  # type: ignore[no-untyped-def]
    return load(["recipe=imagenet", f"recipe.model={model}", "recipe.num_classes=3", f"recipe.train_crop={crop}",
                 f"recipe.eval_crop={crop}", f"recipe.eval_resize={crop}", *extra])  # fmt: skip


def one_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One SGD step on the loop's own loss (``normalized_loss`` over the recipe's counts); the loss and
    the outputs."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    out = model(batch)
    totals = {k: torch.tensor(float(n)) for k, n in imagenet.count(batch).items()}
    loss = normalized_loss(out, totals, world=1)
    loss.backward()
    opt.step()
    return loss.detach(), out


@pytest.mark.parametrize(("name", "crop"), sorted(SMALLEST.items()))
def test_any_torchvision_classifier_trains_one_step_at_its_smallest_input(name: str, crop: int) -> None:
    cfg = classifier_config(name, crop)
    torch.manual_seed(0)
    model = imagenet.build_model(cfg)
    batch = imagenet.example_batch(cfg, 2)
    batch["labels"] = torch.tensor([0, 2])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, out = one_step(model, batch)
    assert torch.isfinite(loss), f"{name}: loss {loss}"
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    if name.startswith("vit_"):  # torchvision zero-inits its head, so step one trains the head alone
        assert {"net.heads.head.weight", "net.heads.head.bias"} <= changed
    else:
        assert len(changed) >= 0.9 * len(before), f"{name}: {len(changed)} of {len(before)} parameters changed"
    heads = AUX_HEADS.get(name, ())
    assert ("ce_aux" in out) == bool(heads)  # the auxiliary heads' weighted loss, beside the main one
    for head in heads:  # ... and the heads learn from it
        assert any(n.startswith(f"net.{head}") for n in changed), f"{name}: {head} did not train"
    model.eval()
    with torch.no_grad():
        metrics = model(batch)
    assert set(metrics) == {"ce", "top1", "top5"}  # top-k from the main logits
    assert 0 <= float(metrics["top1"]) <= float(metrics["top5"]) <= 2


def test_aux_loss_has_the_published_weights() -> None:
    torch.manual_seed(0)
    cfg = classifier_config("googlenet", 15)
    model = imagenet.build_model(cfg).train()
    batch = {**imagenet.example_batch(cfg, 2), "labels": torch.tensor([0, 1])}
    with torch.no_grad():
        torch.manual_seed(1)  # the same dropout in both passes
        out = model(batch)
        torch.manual_seed(1)
        raw = model.net(batch["images"])
    ce = lambda logits: nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")  # noqa: E731
    assert torch.allclose(out["ce"], ce(raw.logits))
    assert torch.allclose(out["ce_aux"], 0.3 * ce(raw.aux_logits1) + 0.3 * ce(raw.aux_logits2))


def test_crops_a_model_cannot_take_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"recipe.train_crop: inception_v3 trains its auxiliary .* at least 299"):
        imagenet.build_model(classifier_config("inception_v3", 298))
    with pytest.raises(ConfigError, match=r"recipe.eval_crop: vit_b_16 is built for one input size.*eval_crop=32"):
        imagenet.build_model(classifier_config("vit_b_16", 32, "recipe.eval_crop=48"))


def test_the_memory_estimate_traces_a_model_with_auxiliary_heads() -> None:
    from launcher import memory

    est = memory.estimate(classifier_config("googlenet", 15), imagenet)
    assert est.per_sample_gb > 0 and est.flops_per_sample and est.flops_per_sample > 0


def test_the_memory_estimate_reads_no_weights_file(tmp_path: Path) -> None:
    """The estimate's model has the same shapes whatever file a run starts from: no file is read (this
    one does not exist) and the cached profile is shared."""
    from launcher import memory

    plain = classifier_config("resnet18", 32)
    named = classifier_config("resnet18", 32, f"recipe.weights={tmp_path / 'absent.pth'}")
    assert memory.estimate(named, imagenet) == memory.estimate(plain, imagenet)
    assert memory._cache_path(memory.without_weights(named), "memory") == memory._cache_path(plain, "memory")


# --- weights from a local file -----------------------------------------------------------


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """``state`` with every float tensor moved off any fresh init (variances stay positive) and the
    BatchNorm counters set."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        out[k] = v + torch.rand(v.shape, generator=g) if v.is_floating_point() else torch.full_like(v, 7)
    return out


def test_imagenet_weights_load_whole_or_wrapped_in_a_checkpoint(tmp_path: Path) -> None:
    state = perturbed(torchvision.models.resnet18(num_classes=3).state_dict(), seed=1)
    for how, saved in (("bare", state), ("model", {"model": state, "epoch": 3}), ("state_dict", {"state_dict": state})):
        path = tmp_path / f"{how}.pth"
        torch.save(saved, path)
        net = imagenet.build_model(classifier_config("resnet18", 32, f"recipe.weights={path}")).net
        got = net.state_dict()
        assert got.keys() == state.keys()
        assert all(torch.equal(got[k], v) for k, v in state.items()), how


def test_coco_backbone_weights_survive_frozen_bn_and_the_stem_stays_frozen(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = perturbed(torchvision.models.resnet50().state_dict(), seed=2)  # an ImageNet R50's keys, fc included
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    cfg = load(["recipe=coco", "scale=smoke", f"recipe.backbone_weights={path}", "recipe.trainable_backbone_layers=3",
                "cluster.use_gpu=false", "planner.memory.model_gb=1", "planner.memory.per_sample_gb=0.1"])  # fmt: skip
    plan = build_plan(cfg, None)
    assert plan.norm == "frozen_bn"  # the recipe's policy at 2 images per worker
    model = convert_norm(coco.build_model(cfg), plan.norm)  # as the worker builds it
    body = model.net.backbone.body  # type: ignore[union-attr]
    got = body.state_dict()
    expected = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    assert got.keys() == expected.keys()  # every parameter and BN buffer, nothing else
    assert all(torch.equal(got[k], v) for k, v in expected.items())  # running stats kept through the conversion
    assert {type(m).__name__ for m in body.modules() if "Norm" in type(m).__name__} == {"FrozenBatchNorm2d"}
    frozen = [n for n, p in body.named_parameters() if not p.requires_grad]
    trained = [n for n, p in body.named_parameters() if p.requires_grad]
    assert frozen and all(n.startswith(("conv1.", "layer1.")) for n in frozen)  # the stem and res2
    assert {n.split(".")[0] for n in frozen} == {"conv1", "layer1"}
    assert {n.split(".")[0] for n in trained} == {"layer2", "layer3", "layer4"}


def test_a_weights_file_that_does_not_fit_lists_its_mismatches(tmp_path: Path) -> None:
    state = torchvision.models.resnet50().state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    state["extra.head.weight"] = torch.zeros(2)
    for k in [k for k in state if k.startswith("layer4.")]:
        del state[k]
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    cfg = load(["recipe=coco", "scale=smoke", f"recipe.backbone_weights={path}"])
    with pytest.raises(ConfigError) as e:
        weights.check(cfg, coco.build_model)  # on the driver, before anything is scheduled (launch.py)
    text = str(e.value)
    assert "3 config errors" in text
    missing = sum(1 for k in torchvision.models.resnet50().state_dict() if k.startswith("layer4.")
                  and not k.endswith("num_batches_tracked"))  # fmt: skip
    assert f"recipe.backbone_weights: {path}: {missing} key(s) missing from the file: layer4." in text
    assert f"({missing - 5} more)" in text  # a few names, then the count
    assert "1 key(s) not in the model: extra.head.weight" in text
    assert "1 key(s) with another shape: conv1.weight (64, 3, 5, 5) in the file, (64, 3, 7, 7) in the model" in text


def test_the_driver_checks_weights_on_the_meta_device_and_the_data_never_reads_them(tmp_path: Path) -> None:
    """``weights.check`` (the driver, before Ray) reads and checks the file against a model that holds no
    memory; ``build_data``, which every worker runs too, does not read it (each worker reads it once,
    in ``build_model``)."""
    state = perturbed(torchvision.models.resnet50().state_dict(), seed=3)
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    cfg = load(["recipe=coco", "scale=smoke", f"recipe.backbone_weights={path}"])
    built: list[nn.Module] = []

    def build(c: Config) -> nn.Module:
        built.append(coco.build_model(c))
        return built[-1]

    weights.check(cfg, build)
    (model,) = built
    assert {t.device.type for t in model.state_dict().values()} == {"meta"}  # nothing allocated, nothing loaded
    weights.check(load(["recipe=coco", "scale=smoke"]), lambda c: pytest.fail("no file named: no model built"))
    path.unlink()
    for recipe, c in ((coco, cfg), (imagenet, load(["recipe=imagenet", "scale=smoke", f"recipe.weights={path}"]))):
        recipe.build_data(c, tmp_path / "cache")  # the file is gone, and nothing asks for it
        with pytest.raises(ConfigError, match="is not a file"):
            weights.check(c, recipe.build_model)


@pytest.mark.parametrize("how", ["missing", "not-torch", "no-tensors"])
def test_an_unreadable_weights_file_names_its_key(tmp_path: Path, how: str) -> None:
    path = tmp_path / "w.pth"
    if how == "not-torch":
        path.write_text("not a checkpoint")
    elif how == "no-tensors":
        torch.save({"model": {"epoch": 3}}, path)
    cfg = classifier_config("resnet18", 32, f"recipe.weights={path}")
    expected = {"missing": "is not a file", "not-torch": "cannot read", "no-tensors": "holds no state dict"}[how]
    with pytest.raises(ConfigError, match=rf"recipe.weights: .*{expected}"):
        imagenet.build_model(cfg)


def test_coco_takes_the_backbone_or_the_whole_model_not_both() -> None:
    with pytest.raises(ConfigError, match="recipe.backbone_weights: set with recipe.weights"):
        load(["recipe=coco", "recipe.weights=/a.pth", "recipe.backbone_weights=/b.pth"])
