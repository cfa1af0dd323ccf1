"""Optimisers and schedules for pretraining and evaluation (pure PyTorch)."""
from fra.optim.lars import LARC, LARS, lars_param_groups
from fra.optim.schedules import ema_momentum, pretrain_lr, swav_lr, warmup_cosine_lr

__all__ = ["LARC", "LARS", "lars_param_groups", "ema_momentum", "pretrain_lr", "swav_lr", "warmup_cosine_lr",
           "build_optimizer"]


def build_optimizer(model, optim_cfg):
    """The pretraining optimiser described by an :class:`fra.config.OptimConfig`."""
    import torch

    if optim_cfg.optimizer == "lars":
        groups = lars_param_groups(model, optim_cfg.weight_decay)
        return LARS(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum, eta=optim_cfg.lars_eta)
    params = [p for p in model.parameters() if p.requires_grad]
    if optim_cfg.optimizer == "larc":
        return LARC(params, lr=optim_cfg.lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay,
                    trust_coefficient=optim_cfg.lars_eta)
    if optim_cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                               weight_decay=optim_cfg.weight_decay)
    return torch.optim.AdamW(params, lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)
