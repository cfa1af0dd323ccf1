"""FRA models: pure PyTorch (no Ray / MLflow imports anywhere below this package)."""
from fra.models.backbones import BACKBONES, build_backbone, register_backbone
from fra.models.fra import FRA, FRAOutput, OnlineView, build_model, online_view
from fra.models.neck import NeckOutput, RegionNeck

__all__ = ["BACKBONES", "build_backbone", "register_backbone", "FRA", "FRAOutput", "OnlineView", "build_model", "online_view",
           "NeckOutput", "RegionNeck"]
