"""KP and WM against their theory: Kolen-Pollack's ``W - B`` decay (003 eq. 14) and weight
mirrors' mirror mode (000 eq. 21)."""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...convert import convert, feedback_layers
from ...metrics import alignment
from ...mirror import WM, mirror
from ..data import load_dataset
from ..experiment import torch_threads
from ..models import build_model
from ..plotting import panels, save_figure
from .common import (
    DPI,
    MAX_PNG_BYTES,
    ItemResult,
    minibatches,
    train_steps,
)
from .verdicts import judge_all, verdict_table

log = logging.getLogger(__name__)

# --- item 6: convergence of KP and WM ------------------------------------------------------------


def feedback_convergence(name: str, config: dict[str, Any], out: Path) -> ItemResult:
    """KP: ``W - B`` shrinks as ``(1 - eta lambda)^t`` (003 eq. 14) under plain SGD; WM: mirror
    mode moves B towards ``k W`` as ``E[B_t] = (1 - lambda)^t B_0 + (1 - (1 - lambda)^t) k W``
    (000 eq. 21), up to the noise of finite mirror batches. The config's ``claims`` are judged on
    ``kp_rel_dev`` (the largest relative deviation from eq. 14 over the KP settings) and
    ``wm_dev_deg`` (the largest distance of the last angle to theory over the WM settings, in
    degrees).

    Paper: 003 eq. (12)-(18); 000 App. A eq. (21)-(22), Alg. 1.
    """
    started = time.perf_counter()
    data = load_dataset(config["data"])
    x, y = data.train.tensors  # type: ignore[attr-defined]
    rows: list[dict[str, Any]] = []
    kp_curves, wm_curves = {}, {}
    with torch_threads(1):
        for wd in config["kp"]["weight_decay"]:
            kp_curves[wd] = _kp_curve(config, wd, x, y)
            rows.append({"rule": "kp", "setting": f"lambda={wd}", **kp_curves[wd][-1]})
        for setting in config["wm"]["settings"]:
            key = f"eta_b={setting['eta_b']}, lambda={setting['decay']}"
            wm_curves[key] = _wm_curve(config, setting, x)
            rows.append({"rule": "wm", "setting": key, **wm_curves[key][-1]})
    lines = [
        "| rule | setting | steps | measured (last layer) | theory |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        what = "||W-B|| / ||W0-B0||" if row["rule"] == "kp" else "angle B, W (deg)"
        lines.append(
            f"| {row['rule'].upper()} | {row['setting']} | {row['step']} | "
            f"{what} = {row['measured']:.4g} | {row['theory']:.4g} |"
        )
    values = {
        "kp_rel_dev": [
            max(abs(r["measured"] / r["theory"] - 1) for r in rows if r["rule"] == "kp")
        ],
        "wm_dev_deg": [max(abs(r["measured"] - r["theory"]) for r in rows if r["rule"] == "wm")],
    }
    table = "\n".join(lines) + "\n\n" + verdict_table(judge_all(config.get("claims", []), values))
    figures = [_convergence_figure(config, kp_curves, wm_curves, out / f"{name}.png")]
    return ItemResult(name, table, figures, rows, time.perf_counter() - started)


def _kp_curve(config: dict[str, Any], wd: float, x: Tensor, y: Tensor) -> list[dict[str, Any]]:
    settings = config["kp"]
    torch.manual_seed(0)
    model = convert(
        build_model("mlp", tuple(x.shape[1:]), 10, widths=settings["widths"]), "kp", seed=0
    )
    lr = settings["lr"]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    name, layer = feedback_layers(model)[-1]
    steps, every = settings["steps"], settings["log_every"]
    gap0 = float((layer.weight - layer.feedback_weight).detach().norm())
    generator = torch.Generator().manual_seed(0)
    batches = itertools.islice(minibatches(len(x), settings["batch_size"], generator), steps)

    def measure(step: int) -> dict[str, Any]:
        gap = float((layer.weight - layer.feedback_weight).detach().norm())
        return {
            "measured": gap / gap0,
            "theory": (1 - lr * wd) ** step,
            "angle_deg": alignment(model)[name]["angle_deg"],
        }

    batches_xy = ((x[idx], y[idx]) for idx in batches)
    return train_steps(model, optimizer, F.cross_entropy, batches_xy, measure, every).curve


def _wm_curve(
    config: dict[str, Any], setting: Mapping[str, Any], x: Tensor
) -> list[dict[str, Any]]:
    settings = config["wm"]
    torch.manual_seed(0)
    model = build_model("mlp", tuple(x.shape[1:]), 10, widths=settings["widths"])
    model = convert(
        model,
        "wm",
        seed=0,
        warmup_steps=0,
        mirror_batch=settings["mirror_batch"],
        eta_b=setting["eta_b"],
        decay=setting["decay"],
    )
    name, layer = feedback_layers(model)[-1]
    mirror(model, 0, example_input=x[:8])
    w = layer.weight.detach().clone()
    b0 = layer.feedback_weight.detach().clone()
    decay = setting["decay"]
    rule = layer.rule
    if not isinstance(rule, WM):
        raise TypeError(f"{name} has rule {rule!r}, not wm")
    k = rule.fixed_point_scale  # B -> k W (000 eq. 21)
    # The plateau set by finite mirror batches (asymprop.mirror.WM): tan^2 = c n_in decay /
    # ((2 - decay) N), c = 2 - 2/pi for a ReLU drive with batch means subtracted, reached as the
    # noise accumulates, (1 - (1 - decay)^(2t)).
    c = 2 - 2 / math.pi
    tan2_floor = c * w.shape[1] * decay / ((2 - decay) * settings["mirror_batch"])
    unit = w / w.norm()
    curve = []
    for step in range(settings["steps"] + 1):
        if step % settings["log_every"] == 0 or step == settings["steps"]:
            keep = (1 - decay) ** step
            expected = keep * b0 + (1 - keep) * k * w  # 000 eq. 21 in expectation
            along = float((expected * unit).sum())
            across2 = float((expected - along * unit).norm()) ** 2
            noise2 = (1 - keep**2) * tan2_floor * float(k * w.norm()) ** 2
            theory = math.degrees(math.atan2(math.sqrt(across2 + noise2), along))
            curve.append(
                {"step": step, "measured": alignment(model)[name]["angle_deg"], "theory": theory}
            )
        if step < settings["steps"]:
            mirror(model, 1)
    return curve


def _convergence_figure(
    config: dict[str, Any],
    kp: dict[Any, list[dict[str, Any]]],
    wm: dict[str, list[dict[str, Any]]],
    path: Path,
) -> Path:
    fig, axes = panels(1, 2, 3.6, 2.8)
    ax = axes[0][0]
    for i, (wd, curve) in enumerate(kp.items()):
        steps = [r["step"] for r in curve]
        color = f"C{i}"
        ax.semilogy(steps, [r["measured"] for r in curve], color=color, label=f"lambda={wd}")
        ax.semilogy(steps, [r["theory"] for r in curve], color=color, ls=":", lw=2)
    ax.set_title(f"KP, SGD lr {config['kp']['lr']}: ||W-B|| / ||W0-B0||", fontsize=8)
    ax.set_xlabel("step")
    ax.legend(fontsize=7, title="dotted: (1 - lr lambda)^t", title_fontsize=6)
    ax = axes[0][1]
    for i, (key, curve) in enumerate(wm.items()):
        steps = [r["step"] for r in curve]
        color = f"C{i}"
        ax.plot(steps, [r["measured"] for r in curve], color=color, label=key)
        ax.plot(steps, [r["theory"] for r in curve], color=color, ls=":", lw=2)
    ax.set_title("WM mirror mode: angle B, W (deg)", fontsize=8)
    ax.set_xlabel("mirror step")
    ax.legend(fontsize=6, title="dotted: E[B_t] (eq. 21)", title_fontsize=6)
    return save_figure(fig, path, dpi=DPI, max_bytes=MAX_PNG_BYTES)


ITEMS = {"feedback-convergence": feedback_convergence}
"""This module's items (:mod:`asymprop.harness.reproduce`)."""
