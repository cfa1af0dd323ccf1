"""FRA losses: one module per loss and a combiner (pure PyTorch)."""
from fra.losses.cluster import ClusterLoss, sinkhorn
from fra.losses.combined import FRALoss, build_loss
from fra.losses.instance import InstanceLoss, cosine_loss
from fra.losses.region import RegionLoss

__all__ = ["ClusterLoss", "sinkhorn", "FRALoss", "build_loss", "InstanceLoss", "cosine_loss", "RegionLoss"]
