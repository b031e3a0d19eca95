"""AdamW with fp32 master weights for models that compute in bf16.

A bf16 weight has 8 significant bits: an update smaller than ~1/256 of the weight rounds away, so
pure-bf16 AdamW at lr 1e-6 leaves almost every weight unchanged (docs/design.md: 1.9% moved).
``MasterWeightAdamW`` keeps an fp32 copy of each low-precision parameter, runs torch's own AdamW
(fused on CUDA) on the copies and writes them back rounded to bf16, so the model still runs in bf16
(half the memory traffic of fp32 weights) while updates accumulate exactly.

Gradients accumulate in fp32 too: a post-accumulate-grad hook on each low-precision parameter adds
its bf16 ``.grad`` into the fp32 master's ``.grad`` after every backward and frees the bf16 one, so
summing many microbatches does not round the running sum to 8 bits each time (issue 27.2: the
relative error against float64 grew from 5.7e-3 with 1 microbatch to 8.4e-3 with 64). Memory: one
fp32 gradient per parameter (4 bytes, 6 GB for a 1.5B model) held from the first backward of a step
to ``step``, instead of a bf16 one (2 bytes) plus a transient fp32 copy at the step; the bf16 grad
lives only between a parameter's accumulation and its hook.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

_HYPER = ("lr", "betas", "eps", "weight_decay")


def _use_fused(params: list[torch.Tensor]) -> bool:
    return bool(params) and all(p.is_cuda for p in params)


_TRITON_KERNEL = None


def _triton_kernel():
    """A one-pass AdamW for bf16/fp16 params with fp32 master/moments (CUDA + Triton only).

    Reads the fp32 (accumulated) grad, the fp32 master and moments once and writes master, moments
    and the low-precision param once: 30 bytes per bf16 parameter, against ~46 for torch's fused
    AdamW + copy back + in-place clipping. None where Triton is unavailable.
    """
    global _TRITON_KERNEL
    if _TRITON_KERNEL is None:
        try:
            import triton
            import triton.language as tl
        except ImportError:
            _TRITON_KERNEL = False
            return None

        @triton.jit
        def kernel(
            p_ptr,
            g_ptr,
            w_ptr,
            m_ptr,
            v_ptr,
            scale_ptr,
            n,
            lr,
            beta1,
            beta2,
            eps,
            decay,
            step_size,
            bc2_sqrt,
            BLOCK: tl.constexpr,
        ):
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(scale_ptr)
            w = tl.load(w_ptr + offs, mask=mask, other=0.0)
            m = tl.load(m_ptr + offs, mask=mask, other=0.0)
            v = tl.load(v_ptr + offs, mask=mask, other=0.0)
            w = w * decay
            m = m + (1.0 - beta1) * (g - m)
            v = beta2 * v + (1.0 - beta2) * g * g
            w = w - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
            tl.store(w_ptr + offs, w, mask=mask)
            tl.store(m_ptr + offs, m, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)
            tl.store(p_ptr + offs, w.to(p_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)

        _TRITON_KERNEL = kernel
    return _TRITON_KERNEL or None


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW stepping fp32 master copies of (bf16/fp16) params, then copying them back.

    Behaves like ``torch.optim.AdamW`` to callers: ``param_groups`` (LR schedulers write ``lr``
    there), ``zero_grad``, ``step``, ``state_dict``/``load_state_dict`` (the masters and AdamW's moments
    are saved, so a resumed run continues bit-for-bit). fp32 params are stepped in place (no copy).
    ``lr``, ``betas`` and ``weight_decay`` have no default here: the trainers' come from
    config/schema.yaml (through ``make_optimizer``); eps is torch's AdamW default.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        *,
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        eps: float = 1e-8,
        fused: bool | None = None,
    ):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.masters: list[list[torch.Tensor]] = []
        inner_groups = []
        for group in self.param_groups:
            masters = [
                p if p.dtype == torch.float32 else p.detach().to(torch.float32).requires_grad_(True)
                for p in group["params"]
            ]
            self.masters.append(masters)
            inner_groups.append({"params": masters, **{k: group[k] for k in _HYPER}})
        flat = [m for ms in self.masters for m in ms]
        use_fused = _use_fused(flat) if fused is None else fused
        self.inner = torch.optim.AdamW(
            inner_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=use_fused or None
        )
        # One-pass Triton kernel on CUDA for the low-precision params (fp32 ones use torch's AdamW).
        # MATHPT_MASTER_KERNEL=0 turns it off.
        flag = os.environ.get(
            "MATHPT_MASTER_KERNEL", "1"
        )  # "force": also off CUDA (TRITON_INTERPRET=1 tests)
        low = [p for g in self.param_groups for p in g["params"] if p.dtype != torch.float32]
        self.use_kernel = (
            flag != "0"
            and bool(low)
            and (flag == "force" or all(m.is_cuda for m in flat))
            and all(p.is_contiguous() for p in low)
            and _triton_kernel() is not None
        )
        self._grad_scale: torch.Tensor | None = None
        self._hooks = [
            p.register_post_accumulate_grad_hook(functools.partial(_fold_grad, master=m))
            for group, masters in zip(self.param_groups, self.masters, strict=True)
            for p, m in zip(group["params"], masters, strict=True)
            if m is not p and p.requires_grad
        ]

    def _pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for group, masters in zip(self.param_groups, self.masters, strict=True):
            yield from zip(group["params"], masters, strict=True)

    def _master_grads(self) -> list[torch.Tensor]:
        """The fp32 gradients, after folding in any low-precision ``.grad`` set without a backward."""
        out = []
        for p, m in self._pairs():
            if m is not p:
                _fold_grad(p, m)
            if m.grad is not None:
                out.append(m.grad)
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for p, m in self._pairs():
            if m is not p and m.grad is not None:
                if set_to_none:
                    m.grad = None
                else:
                    m.grad.zero_()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Total grad norm (before clipping); the clip factor is applied inside the next ``step``.

        Same result as ``torch.nn.utils.clip_grad_norm_`` followed by ``step``, without a separate
        pass that rescales every gradient in place.
        """
        grads = self._master_grads()
        if not grads:
            return torch.zeros(())
        # per-tensor norms accumulated and returned in fp32
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
        if math.isfinite(max_norm):
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            if self.use_kernel:
                self._grad_scale = coef
            else:
                torch._foreach_mul_(grads, coef.to(grads[0].device))
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale, self._grad_scale = self._grad_scale, None
        self._master_grads()  # fold any .grad set by hand (no backward, so no hook ran)
        for group, inner_group, masters in zip(
            self.param_groups, self.inner.param_groups, self.masters, strict=True
        ):
            for k in _HYPER:  # schedulers change self.param_groups; the inner AdamW must follow
                inner_group[k] = group[k]
            if self.use_kernel:
                for p, m in zip(group["params"], masters, strict=True):
                    if m is not p and m.grad is not None:
                        self._kernel_step(p, m, group, scale)
                        m.grad = None  # free the fp32 grad right away
        if self.use_kernel:
            # fp32 params, if any, still go through torch's AdamW
            if any(
                m is p and p.grad is not None
                for g, ms in zip(self.param_groups, self.masters, strict=True)
                for p, m in zip(g["params"], ms, strict=True)
            ):
                self.inner.step()
            return loss
        self.inner.step()
        low_p, low_m = [], []
        for group, masters in zip(self.param_groups, self.masters, strict=True):
            for p, m in zip(group["params"], masters, strict=True):
                if m is not p:
                    low_p.append(p)
                    low_m.append(m)
                    m.grad = None  # free the fp32 grad copy right away
        if low_p:
            torch._foreach_copy_(low_p, low_m)
        return loss

    def _kernel_step(self, p: torch.Tensor, m: torch.Tensor, group: dict, scale: torch.Tensor | None) -> None:
        """AdamW on one low-precision param through the Triton kernel; state kept where torch keeps it."""
        st = self.inner.state[m]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(m, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(m, memory_format=torch.preserve_format)
        st["step"] += 1
        step = float(st["step"])
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        lr = float(lr)
        if scale is None:
            scale = torch.ones((), dtype=torch.float32, device=p.device)
        n = p.numel()
        block = 4096
        grad = m.grad if m.grad.is_contiguous() else m.grad.contiguous()
        _triton_kernel()[(triton_cdiv(n, block),)](
            p,
            grad,
            m,
            st["exp_avg"],
            st["exp_avg_sq"],
            scale,
            n,
            lr,
            b1,
            b2,
            eps,
            1.0 - lr * wd,
            lr / (1.0 - b1**step),
            math.sqrt(1.0 - b2**step),
            BLOCK=block,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "masters": [[m.detach().clone() for m in ms] for ms in self.masters],
            "hyper": [{k: g[k] for k in _HYPER} for g in self.param_groups],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state_dict["inner"])
        with torch.no_grad():
            for group, masters, saved, hyper in zip(
                self.param_groups, self.masters, state_dict["masters"], state_dict["hyper"], strict=True
            ):
                group.update(hyper)
                for p, m, s in zip(group["params"], masters, saved, strict=True):
                    m.copy_(s)
                    if m is not p:
                        p.copy_(m)


def _fold_grad(param: torch.Tensor, master: torch.Tensor) -> None:
    """Move ``param.grad`` (low precision) into ``master.grad`` (fp32): add, then free it."""
    if param.grad is None:
        return
    with torch.no_grad():
        if master.grad is None:
            master.grad = param.grad.to(torch.float32)
        else:
            master.grad.add_(param.grad)
    param.grad = None


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _cfg_get(cfg: Any, key: str) -> Any:
    """``cfg[key]`` (mapping) or ``cfg.key`` (settings object); no fallback: defaults live in the schema."""
    missing = object()
    value = cfg.get(key, missing) if isinstance(cfg, Mapping) else getattr(cfg, key, missing)
    if value is missing:
        raise KeyError(
            f"optimizer setting {key!r} missing (train.sft.{key} / train.pg.{key}; "
            "validate_config fills its default from config/schema.yaml)"
        )
    return value


def make_optimizer(model: torch.nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """AdamW for ``model`` from ``cfg`` (mapping or object: lr, betas, weight_decay, all required:
    their defaults live in config/schema.yaml only). eps is torch's AdamW default, 1e-8.

    Weight decay applies to matrices only (not norms/biases), as in nanoGPT. Low-precision params
    get ``MasterWeightAdamW``; an all-fp32 model gets plain ``torch.optim.AdamW`` (fused on CUDA).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in params:  # tied weights appear once
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    wd = float(_cfg_get(cfg, "weight_decay"))
    groups = [
        g
        for g in ({"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]
    kw = {
        "lr": float(_cfg_get(cfg, "lr")),
        "betas": tuple(float(b) for b in _cfg_get(cfg, "betas")),
        "weight_decay": wd,  # each group sets its own; this is only the optimizer's default
    }
    if any(p.dtype in (torch.bfloat16, torch.float16) for p in params):
        return MasterWeightAdamW(groups, **kw)
    return torch.optim.AdamW(groups, **kw, fused=_use_fused(params) or None)


def lr_schedule(
    optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.1, decay: str = "cosine"
):
    """Linear warm-up (step 0 runs at lr / warmup_steps), then cosine decay to ``min_ratio`` of the
    peak learning rate, or ``decay="constant"``: the peak from the end of the warm-up on."""
    if decay not in ("cosine", "constant"):
        raise ValueError(f"lr decay {decay!r}: expected 'cosine' or 'constant'")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        if decay == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
