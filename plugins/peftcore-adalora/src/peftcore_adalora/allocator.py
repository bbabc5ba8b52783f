"""AdaLoRA's rank allocation (PEFT's RankAllocator) and its orthogonality regulariser.

Parameter names used as keys (``ipt``, ``rank_pattern``) are PEFT's: paths inside
the wrapped transformers model, e.g. ``bert.encoder.layer.0.attention.self.query.lora_E.default``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from peftcore_adalora.config import rank_pattern_module
from peftcore_adalora.layer import AdaLoraLayer

TRIPLET = ("lora_A", "lora_B", "lora_E")


def adapter_layers(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, AdaLoraLayer]]:
    """(path inside ``model``, layer) for every AdaLoRA layer that holds ``adapter_name``."""
    for path, module in model.named_modules():
        if isinstance(module, AdaLoraLayer) and adapter_name in module.lora_A:
            yield path, module


def orthogonal_regularizer(model: nn.Module, adapter_name: str) -> torch.Tensor | float:
    """mean over every A and B of ||P Pᵀ − I||_F (A: rows orthonormal) / ||PᵀP − I||_F (B: columns)."""
    total, count = 0, 0
    for _, layer in adapter_layers(model, adapter_name):
        for kind in ("lora_A", "lora_B"):
            p = getattr(layer, kind)[adapter_name]
            cov = p @ p.T if kind == "lora_A" else p.T @ p
            identity = torch.eye(*cov.size(), out=torch.empty_like(cov))
            total = total + torch.norm(cov - identity, p="fro")
            count += 1
    return total / count if count else 0


class RankAllocator:
    """Scores every triplet (A row, E value, B column) and masks the weakest to a shrinking budget.

    Sensitivity of a parameter is |p · ∇p|, smoothed with an EMA (``beta1``); its
    uncertainty is an EMA (``beta2``) of |sensitivity − smoothed|; the score is their
    product. A triplet's score is E's plus the mean of its A row and B column.
    """

    def __init__(self, model: nn.Module, peft_config, adapter_name: str):
        self.peft_config = peft_config
        self.adapter_name = adapter_name
        self.beta1, self.beta2 = peft_config.beta1, peft_config.beta2  # in (0, 1), target_r <= init_r: the config
        self.reset_ipt()
        self._set_budget_scheduler(model)

    def set_total_step(self, total_step: int) -> None:
        self.peft_config.total_step = total_step

    def reset_ipt(self) -> None:
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def _named_triplets(self, model: nn.Module) -> Iterator[tuple[str, str, nn.Parameter]]:
        for path, layer in adapter_layers(model, self.adapter_name):
            for kind in TRIPLET:
                yield f"{path}.{kind}.{self.adapter_name}", kind, getattr(layer, kind)[self.adapter_name]

    def _set_budget_scheduler(self, model: nn.Module) -> None:
        self.init_bgt = 0
        modules = set()
        for name, kind, param in self._named_triplets(model):
            if kind == "lora_A":
                self.init_bgt += param.size(0)
                modules.add(name.replace("lora_A", "%s"))
        self.name_set = sorted(modules)
        self.target_bgt = self.peft_config.target_r * len(self.name_set)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total rank budget, whether to mask) at ``step``: flat, cubic decay, then flat at the target."""
        tinit, tfinal, total_step = self.peft_config.tinit, self.peft_config.tfinal, self.peft_config.total_step
        if step <= tinit:
            return self.init_bgt, False
        if step > total_step - tfinal:
            return self.target_bgt, True
        remaining = 1 - (step - tinit) / (total_step - tfinal - tinit)
        budget = int((self.init_bgt - self.target_bgt) * (remaining**3) + self.target_bgt)
        return budget, step % self.peft_config.deltaT == 0

    @torch.no_grad()
    def update_ipt(self, model: nn.Module) -> None:
        for name, _, param in self._named_triplets(model):
            if param.grad is None:
                raise RuntimeError(
                    f"AdaLoRA update_and_allocate: {name} has no gradient. Call it after loss.backward() and "
                    "before optimizer.zero_grad() (or use peftcore_adalora.AdaLoraCallback with the Trainer)"
                )
            if name not in self.ipt:
                self.ipt[name] = torch.zeros_like(param)
                self.exp_avg_ipt[name] = torch.zeros_like(param)
                self.exp_avg_unc[name] = torch.zeros_like(param)
            self.ipt[name] = (param * param.grad).abs().detach()
            self.exp_avg_ipt[name] = self.beta1 * self.exp_avg_ipt[name] + (1 - self.beta1) * self.ipt[name]
            self.exp_avg_unc[name] = (
                self.beta2 * self.exp_avg_unc[name] + (1 - self.beta2) * (self.ipt[name] - self.exp_avg_ipt[name]).abs()
            )

    def _element_score(self, name: str) -> torch.Tensor:
        return self.exp_avg_ipt[name] * self.exp_avg_unc[name]

    def _triplet_scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Score per triplet, keyed by the lora_E parameter name, shape (r, 1)."""
        vector_ipt: dict[str, list[torch.Tensor]] = {}
        value_ipt: dict[str, torch.Tensor] = {}
        for name, kind, _ in self._named_triplets(model):
            if name not in self.exp_avg_ipt:
                raise RuntimeError(
                    f"AdaLoRA: no importance score for {name} yet; update_and_allocate must see gradients first"
                )
            score = self._element_score(name)
            key = name.replace(kind, "%s")
            if kind == "lora_A":
                vector_ipt.setdefault(key, []).append(score.mean(dim=1, keepdim=True))
            elif kind == "lora_B":
                vector_ipt.setdefault(key, []).append(score.mean(dim=0, keepdim=False).view(-1, 1))
            else:
                value_ipt[key] = score
        scores = {}
        for key, vectors in vector_ipt.items():
            combined = value_ipt[key].view(-1) + torch.cat(vectors, dim=1).sum(dim=1).view(-1)
            scores[key % "lora_E"] = combined.view(-1, 1)
        return scores

    @torch.no_grad()
    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        """Zero the E values of the lowest-scored triplets so that about ``budget`` remain."""
        scores = self._triplet_scores(model)
        to_mask = self.init_bgt - budget
        if to_mask <= 0:  # PEFT's kthvalue(k=0) would fail; nothing needs masking
            return {name: [True] * score.shape[0] for name, score in scores.items()}
        threshold = torch.kthvalue(torch.cat([s.view(-1) for s in scores.values()]), k=to_mask)[0].item()
        rank_pattern = {}
        for name, _, param in self._named_triplets(model):
            if name in scores:
                masked = scores[name] <= threshold
                param.masked_fill_(masked, 0.0)
                rank_pattern[name] = (~masked).view(-1).tolist()
        return rank_pattern

    def update_and_allocate(self, model: nn.Module, global_step: int, force_mask: bool = False):
        if global_step < self.peft_config.total_step - self.peft_config.tfinal:
            self.update_ipt(model)
        budget, mask_now = self.budget_schedule(global_step)
        rank_pattern = self.mask_to_budget(model, budget) if (mask_now or force_mask) else None
        return budget, rank_pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, model: nn.Module, rank_pattern: dict[str, list[bool]]) -> None:
        """Keep the final allocation: re-zero the pruned E values after each optimizer step."""
        by_module = {rank_pattern_module(key)[0]: mask for key, mask in rank_pattern.items()}
        for path, layer in adapter_layers(model, self.adapter_name):
            if path not in by_module:
                raise KeyError(f"AdaLoRA rank_pattern has no entry for {path}")
            param = layer.lora_E[self.adapter_name]
            keep = torch.tensor([bool(v) for v in by_module[path]], device=param.device).unsqueeze(-1)
            param.masked_fill_(~keep, 0.0)


def update_and_allocate(adapter_model: nn.Module, global_step: int) -> None:
    """PEFT's ``AdaLoraModel.update_and_allocate``: score, reallocate, and keep the allocation.

    Call after ``loss.backward()`` (and ``optimizer.step()``) and before ``zero_grad()``.
    """
    name = getattr(adapter_model, "trainable_adapter_name", None)
    allocator = getattr(adapter_model, "rankallocator", None)
    if name is None or allocator is None or name not in adapter_model.peft_config:
        raise RuntimeError(
            "update_and_allocate needs a trainable AdaLoRA adapter; this model has none (loaded for inference?)"
        )
    config = adapter_model.peft_config[name]
    boundary = config.total_step - config.tfinal
    if global_step < boundary:
        _, rank_pattern = allocator.update_and_allocate(adapter_model.model, global_step)
        if rank_pattern:
            config.rank_pattern = rank_pattern
    elif global_step == boundary:
        _, rank_pattern = allocator.update_and_allocate(adapter_model.model, global_step, force_mask=True)
        config.rank_pattern = rank_pattern
        allocator.reset_ipt()
    else:
        if not config.rank_pattern:
            raise RuntimeError(
                f"update_and_allocate({global_step}): past total_step - tfinal ({boundary}) but no allocation was "
                "made; call it at every step, starting from 0"
            )
        allocator.mask_using_rank_pattern(adapter_model.model, config.rank_pattern)


def resize_modules_by_rank_pattern(adapter_model: nn.Module, rank_pattern: dict, adapter_name: str) -> None:
    """Shrink each module's triplets to the kept ranks (what loading a saved allocation does)."""
    layers = dict(adapter_layers(adapter_model.model, adapter_name))
    for key, kept in rank_pattern.items():
        path, _ = rank_pattern_module(key)
        if path not in layers:
            raise ValueError(f"AdaLoRA rank_pattern names {path!r}, which holds no AdaLoRA adapter {adapter_name!r}")
        layers[path].resize(adapter_name, kept)


def resize_state_dict_by_rank_pattern(
    state_dict: dict[str, torch.Tensor], rank_pattern: dict, prefix: str = "base_model.model."
) -> dict[str, torch.Tensor]:
    """Cut saved tensors (disk names) to the kept ranks; tensors already that small stay as they are."""
    out = dict(state_dict)
    for key, kept in rank_pattern.items():
        path, _ = rank_pattern_module(key)
        mask = torch.tensor([bool(v) for v in kept])
        rank = int(mask.sum())
        for kind, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            name = f"{prefix}{path}.{kind}"
            if name not in out:
                raise KeyError(f"AdaLoRA rank_pattern names {path!r} but the adapter has no tensor {name!r}")
            tensor = out[name]
            if tensor.shape[dim] == rank:
                continue
            if tensor.shape[dim] != len(kept):
                raise ValueError(
                    f"{name} has {tensor.shape[dim]} ranks but rank_pattern[{key!r}] has {len(kept)} entries"
                )
            out[name] = tensor[mask.to(tensor.device)] if dim == 0 else tensor[:, mask.to(tensor.device)]
    return out
