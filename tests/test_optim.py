"""`optimizer: muon`: the Muon step equals a hand-written transcription of Keller Jordan's reference, its
orthogonalisation approximates the SVD's U·Vᵀ, the rest of the model gets exactly torch.optim.AdamW's step, a run
resumes bitwise, and bad settings fail in one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_train import build_char_data, tiny

import sparkgpt
from sparkgpt.errors import SparkGPTError
from sparkgpt.train import load_train_config, train
from sparkgpt.train.config import TrainConfig
from sparkgpt.train.optim import Muon, build_optimizer, hidden_matrices, orthogonalise, set_learning_rate
from tests.conftest import interrupted_at_step


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    return build_char_data(tmp_path_factory.mktemp("char-data"))


def reference_newton_schulz(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """zeropower_via_newtonschulz5 of github.com/KellerJordan/Muon (muon.py), transcribed (`dtype` added)."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.to(dtype)
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X


def reference_muon_step(param: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor, lr: float, wd: float,
                        beta: float) -> None:
    """muon_update + the step of Muon.step in the same file (Nesterov), transcribed."""
    buffer.lerp_(grad, 1 - beta)
    update = grad.clone().lerp_(buffer, beta)
    update = reference_newton_schulz(update, dtype=torch.float64).float()  # the exact iteration, without bf16
    update *= max(1, grad.size(-2) / grad.size(-1)) ** 0.5
    param.mul_(1 - lr * wd)
    param.add_(update.reshape(param.shape), alpha=-lr)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_muon_step_equals_the_reference_implementation(shape):
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(shape)) for _ in range(2)]  # two of a shape: one batched iteration
    theirs = [p.detach().clone() for p in ours]
    buffers = [torch.zeros(shape) for _ in ours]
    optimizer = Muon([{"params": ours, "muon": True, "weight_decay": 0.1, "lr_scale": 10.0}], lr=2e-3, momentum=0.9)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.02)
    for _ in range(3):
        before = [p.detach().clone() for p in ours]
        for param, reference, buffer in zip(ours, theirs, buffers, strict=True):
            grad = torch.randn(shape)
            param.grad = grad.clone()
            reference_muon_step(reference, grad, buffer, lr=0.02, wd=0.1, beta=0.9)
        optimizer.step()
        for param, reference, buffer, start in zip(ours, theirs, buffers, before, strict=True):
            torch.testing.assert_close(optimizer.state[param]["momentum"], buffer)
            # Ours iterates in bf16: within 2.5% of the exact step (the reference's own bf16 iteration is ~3% off;
            # in float64 the two agree to 1e-12, the test below).
            difference = (param.detach() - reference).norm() / (reference - start).norm()
            assert difference < 0.025, difference


@pytest.mark.parametrize("shape", [(3, 24, 40), (2, 40, 24)])
def test_newton_schulz_equals_the_reference_in_float64(shape):
    """Without bf16 rounding the iteration matches the reference to float64 precision, matrix by matrix."""
    stack = torch.randn(shape, dtype=torch.float64)
    ours = orthogonalise(stack, dtype=torch.float64)
    for matrix, orthogonalised in zip(stack, ours, strict=True):
        torch.testing.assert_close(orthogonalised, reference_newton_schulz(matrix, dtype=torch.float64),
                                   atol=1e-12, rtol=1e-12)


def test_orthogonalise_approximates_the_polar_factor():
    """Against torch.linalg.svd: O ≈ U·Vᵀ (Newton–Schulz is approximate: singular values land in ~[0.7, 1.2])."""
    torch.manual_seed(1)
    matrix = torch.randn(32, 64) @ torch.diag(torch.logspace(0, 2, 64))  # badly conditioned, like gradients
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    polar = u @ vh
    ours = orthogonalise(matrix).float()
    assert ours.shape == matrix.shape
    cosine = (ours * polar).sum() / (ours.norm() * polar.norm())
    assert cosine > 0.95
    singular = torch.linalg.svdvals(ours)
    assert singular.min() > 0.5 and singular.max() < 1.3
    torch.testing.assert_close(orthogonalise(matrix.T).float(), ours.T)  # tall matrices go through the wide side


def test_muon_groups_and_the_adamw_half_follow_torch_adamw():
    """Hidden matrices go to Muon; the embedding, untied head and norms get exactly torch.optim.AdamW's step."""
    config = TrainConfig(optimizer="muon", lr=1e-2, muon_lr=0.03, weight_decay=0.5, beta2=0.95)
    model = sparkgpt.GPT(sparkgpt.preset("tiny-llama", vocab_size=64))
    reference_model = sparkgpt.GPT(model.config)
    reference_model.load_state_dict(model.state_dict())
    optimizer = build_optimizer(model, config)
    hidden = {id(p) for p in hidden_matrices(model)}
    block_matrices = [n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2]
    assert len(hidden) == len(block_matrices) == 7 * 2
    muon_group = optimizer.param_groups[-1]
    assert muon_group["muon"] and {id(p) for p in muon_group["params"]} == hidden
    assert muon_group["lr"] == pytest.approx(0.03)
    set_learning_rate(optimizer, 5e-3)
    assert muon_group["lr"] == pytest.approx(0.015) and optimizer.param_groups[0]["lr"] == 5e-3

    names = {id(p): n for n, p in reference_model.named_parameters()}
    others = [p for p in reference_model.parameters() if not names[id(p)].startswith("blocks.") or p.dim() < 2]
    decayed = [p for p in others if names[id(p)] == "lm_head.weight"]
    reference = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.5},
                                   {"params": [p for p in others if p is not decayed[0]], "weight_decay": 0.0}],
                                  lr=5e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for _ in range(3):  # the same gradients for both (a backward would differ once Muon has moved the blocks)
        gradients = {name: torch.randn_like(p) for name, p in model.named_parameters()}
        for m, opt in ((model, optimizer), (reference_model, reference)):
            for name, param in m.named_parameters():
                param.grad = gradients[name].clone()
            opt.step()
    for name, param in model.named_parameters():
        other = reference_model.get_parameter(name)
        if id(param) in hidden:
            assert not torch.allclose(param, other), name  # Muon moved it differently
        else:
            torch.testing.assert_close(param, other, atol=1e-6, rtol=1e-5, msg=name)


def test_a_muon_run_learns_and_resumes_bitwise(char_data, tmp_path, monkeypatch):
    overrides = tiny(char_data, max_steps=8, save_every=4, eval_every=4, log_every=1, optimizer="muon")
    train("shakespeare-char", tmp_path / "straight", overrides, progress=False)
    with interrupted_at_step(monkeypatch, 6):
        train("shakespeare-char", tmp_path / "resumed", overrides, progress=False)
    train(None, tmp_path / "resumed", resume=True, progress=False)
    straight, resumed = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                         for run in ("straight", "resumed"))
    losses = [[(row["step"], row.get("loss"), row.get("val_loss")) for row in rows] for rows in (straight, resumed)]
    assert len(losses[0]) == 10 and losses[0] == losses[1]
    train_losses = [loss for _, loss, _ in losses[0] if loss is not None]
    assert train_losses[-1] < train_losses[0] - 0.2 and all(map(math.isfinite, train_losses))


@pytest.mark.parametrize("changes, message", [
    ({"optimizer": "sgd"}, "'optimizer' is 'sgd'; expected one of adamw, muon"),
    ({"optimizer": "muon", "muon_lr": "0"}, "'muon_lr' is 0.0; expected a positive number"),
    ({"muon_momentum": "1"}, "'muon_momentum' is 1.0; expected a number in"),
    ({"optimizer": "muon", "parallel": "fsdp"}, "fsdp shards; use parallel: ddp"),
])
def test_bad_muon_settings_fail_in_one_line(changes, message):
    with pytest.raises(SparkGPTError, match=message.replace("(", r"\(")):
        load_train_config("shakespeare-char", changes)
