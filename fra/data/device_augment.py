"""The per-pixel half of the FRA two-view augmentation, batched on the trainer's device.

With ``data.augment_on: device`` the data workers decode, crop, resize and flip (the geometric
part, :meth:`fra.data.augment.TwoViewTransform.render_geometry`) and ship uint8 views together
with each view's photometric parameters (:func:`fra.data.augment.photometric_row`, drawn by the
same per-image generator as the worker placement, so a resumed run gets the same draws). This
module applies those parameters to the whole batch as tensor ops, each sample with its own
parameters, in the reference's order (FRA_SPEC §8):

1. ColorJitter (p = 0.8): brightness, contrast, saturation and hue in the sample's random order,
   each op clamped to [0, 255] as PIL's and torchvision's are; brightness ``f x``, contrast a
   blend with the (rounded) grey mean of the image at that point, saturation a blend with the
   grey image, hue a shift of the HSV hue (torchvision's ``adjust_hue``, without PIL's uint8
   quantisation of H, S and V);
2. RandomGrayscale (p = 0.2): ITU-R 601 luma (``convert("L")``);
3. rounding to integer levels (the reference's image is uint8 here);
4. Gaussian blur at the output size (view 1 p = 1.0, view 2 p = 0.1): separable, per-sample
   kernel of ``2 ceil(4 sigma) + 1`` taps, reflect-101 borders (what the worker placement's
   OpenCV blur computes), rounded;
5. solarise (view 2 p = 0.2): ``255 - x`` where ``x >= 128``.

Flip commutes with all of these (pointwise ops, a symmetric kernel, mirror borders), so it stays
on the workers with the crop. Which samples an op touches is read from the parameter table,
which stays on the host: no device value is read back. Pure PyTorch (no Ray, no MLflow).
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from fra.data.augment import PHOTOMETRIC_COLUMNS

_LUMA = (0.299, 0.587, 0.114)  # PIL's convert("L")
_COL = {name: i for i, name in enumerate(PHOTOMETRIC_COLUMNS)}


class DeviceAugment:
    """Apply per-sample photometric parameters to a uint8 (B, 3, H, W) batch on ``device``.

    Args:
        device: where the ops run (the trainer's device).
        chunk: samples processed at a time (0 = the whole batch). On a CPU a chunk of a few
            images keeps the float working set in cache; on a GPU the whole batch is one launch
            sequence. Default: 0 on CUDA, 16 elsewhere (measured: benchmarks/augment_split.py).
    """

    def __init__(self, device: str | torch.device = "cpu", chunk: int | None = None):
        self.device = torch.device(device)
        self.chunk = int(chunk) if chunk is not None else (0 if self.device.type == "cuda" else 16)

    def __call__(self, views: torch.Tensor, params) -> torch.Tensor:
        """The augmented views, uint8 (B, 3, H, W) on ``self.device``.

        Args:
            views: uint8 (B, 3, H, W), on any device.
            params: float (B, 12) table (:data:`fra.data.augment.PHOTOMETRIC_COLUMNS`), a numpy
                array or a CPU tensor. It is read on the host (which samples each op touches,
                the blur kernels); a table on a GPU would be copied back first, so keep it on the host.
        """
        table = (params.detach().cpu().numpy() if torch.is_tensor(params) else np.asarray(params)).astype(np.float32)
        if views.dtype != torch.uint8 or views.dim() != 4 or views.shape[1] != 3:
            raise ValueError(f"expected uint8 views (B, 3, H, W), got {views.dtype} {tuple(views.shape)}")
        if table.shape != (views.shape[0], len(PHOTOMETRIC_COLUMNS)):
            raise ValueError(f"expected a ({views.shape[0]}, {len(PHOTOMETRIC_COLUMNS)}) parameter table, "
                             f"got {table.shape}")
        views = views.to(self.device, non_blocking=True)
        n = views.shape[0]
        step = self.chunk if self.chunk > 0 else max(n, 1)
        if step >= n:
            return self._apply(views, table)
        out = torch.empty_like(views)
        for start in range(0, n, step):
            out[start:start + step] = self._apply(views[start:start + step], table[start:start + step])
        return out

    # ---- the ops (``table`` is a host numpy array: nothing here reads a device value) --------
    def _apply(self, views: torch.Tensor, table: np.ndarray) -> torch.Tensor:
        x = views.float()
        self._jitter(x, table)
        grey = np.flatnonzero(table[:, _COL["grey"]] > 0)
        if grey.size:
            idx = self._index(grey)
            x.index_copy_(0, idx, _luma(x.index_select(0, idx)).expand(-1, 3, -1, -1).contiguous())
        x.round_()
        sigma = table[:, _COL["blur_sigma"]]
        blur = np.flatnonzero(sigma > 0)
        if blur.size:
            idx = self._index(blur)
            x.index_copy_(0, idx, self._blur(x.index_select(0, idx), sigma[blur]).round_())
        sol = np.flatnonzero(table[:, _COL["solarize"]] > 0)
        if sol.size:
            idx = self._index(sol)
            part = x.index_select(0, idx)
            x.index_copy_(0, idx, torch.where(part >= 128, 255.0 - part, part))
        return x.clamp_(0, 255).to(torch.uint8)

    def _jitter(self, x: torch.Tensor, table: np.ndarray) -> None:
        rows = np.flatnonzero(table[:, _COL["jitter"]] > 0)
        if not rows.size:
            return
        idx = self._index(rows)
        part = x.index_select(0, idx)
        factors = table[rows, _COL["brightness"]:_COL["hue"] + 1]  # (n, 4)
        order = table[rows, _COL["order0"]:_COL["order3"] + 1].astype(np.int64)
        for k in range(4):
            op = order[:, k]
            # blend x' = f x + (1 - f) other: other = 0 (brightness), grey mean (contrast), grey (saturation)
            f = np.where(op < 3, factors[np.arange(len(op)), np.minimum(op, 2)], 1.0)
            if np.any(f != 1):
                f_d = self._column(f)
                if np.any((op == 1) | (op == 2)):
                    grey = _luma(part)  # (n, 1, H, W): other = mean (contrast), grey (saturation), 0 (brightness)
                    mean = torch.floor(grey.mean(dim=(2, 3), keepdim=True) + 0.5)  # PIL: int(mean + 0.5)
                    other = grey.mul_(self._column(op == 2)).add_(mean * self._column(op == 1)).mul_(1 - f_d)
                    part.mul_(f_d).add_(other)
                else:
                    part.mul_(f_d)
                part.clamp_(0, 255)
            hue = np.flatnonzero((op == 3) & (factors[:, 3] != 0))
            if hue.size:
                hidx = self._index(hue)
                shift = torch.from_numpy(factors[hue, 3].copy()).to(self.device, non_blocking=True)
                part.index_copy_(0, hidx, adjust_hue(part.index_select(0, hidx) / 255.0, shift).mul_(255.0))
        x.index_copy_(0, idx, part)

    def _blur(self, x: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
        """Separable Gaussian, per-sample sigma (host array), reflect-101 borders."""
        n, c, h, w = x.shape
        radius = min(int(math.ceil(4 * float(sigma.max()))), h - 1, w - 1)  # reflect padding needs radius < side
        taps = np.arange(-radius, radius + 1, dtype=np.float64)
        s = sigma.astype(np.float64)[:, None]
        k = np.exp(-(taps[None] ** 2) / (2 * s * s)) * (np.abs(taps)[None] <= np.ceil(4 * s))
        k = np.repeat(k / k.sum(1, keepdims=True), c, axis=0).astype(np.float32)  # (n*c, 2r+1)
        k = torch.from_numpy(k).to(self.device, non_blocking=True)
        y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
        y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
        y = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c)
        return y.view(n, c, h, w)

    def _index(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(rows, np.int64)).to(self.device, non_blocking=True)

    def _column(self, values: np.ndarray) -> torch.Tensor:
        """A per-sample host vector as a (n, 1, 1, 1) float tensor on the device."""
        return torch.from_numpy(np.asarray(values, np.float32).copy()).to(self.device, non_blocking=True).view(-1, 1, 1, 1)

    # ---- batches -----------------------------------------------------------------------------
    def apply_batch(self, batch: dict) -> dict:
        """A new batch dict whose ``view1`` / ``view2`` carry their ``aug1`` / ``aug2`` parameters
        (the parameter columns are removed); a batch without them is returned unchanged.

        Views that come with parameters arrive channels-last, uint8 (B, S, S, 3), as the stream's
        ``augment_on: device`` tasks write them; they leave as (B, 3, S, S) (channels-last memory,
        the backbone's own format)."""
        if "aug1" not in batch and "aug2" not in batch:
            return batch
        out = dict(batch)
        for v in ("1", "2"):
            params = out.pop("aug" + v, None)
            if params is not None:
                views = out["view" + v]
                if views.dim() != 4 or views.shape[-1] != 3:
                    raise ValueError(f"view{v} with parameters must be channels-last (B, S, S, 3), "
                                     f"got {tuple(views.shape)}")
                out["view" + v] = self(views.permute(0, 3, 1, 2), params)
        return out


def augment_batches(batches: Iterable[dict], device: str | torch.device = "cpu") -> Iterator[dict]:
    """Each batch with its views augmented on ``device`` when it carries parameter columns
    (``data.augment_on: device``); batches without them pass through untouched."""
    augment = DeviceAugment(device)
    for batch in batches:
        yield augment.apply_batch(batch)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift the HSV hue of RGB images in [0, 1] by ``shift`` (turns, per sample).

    Args:
        x: float (N, 3, H, W) in [0, 1].
        shift: (N,) in [-0.5, 0.5].
    Returns:
        float (N, 3, H, W) in [0, 1].
    """
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    cr = maxc - torch.minimum(torch.minimum(r, g), b)
    # grey pixels (cr = 0): saturation 0 and rc = gc = bc = 0, so hue 0 without a special case
    sat = cr / maxc.clamp(min=1e-12)
    crd = cr.clamp(min=1e-12)
    rc, gc, bc = (maxc - r).div_(crd), (maxc - g).div_(crd), (maxc - b).div_(crd)
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h6 = torch.remainder(hue.add_(6.0 * shift.view(-1, 1, 1).to(x.dtype)), 6.0)
    vs = maxc * sat
    out = []
    for n in (5.0, 3.0, 1.0):  # closed-form HSV -> RGB
        k = h6 + n
        k = torch.where(k >= 6.0, k - 6.0, k)
        out.append(maxc - vs * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(out, 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) ITU-R 601 luma."""
    return (_LUMA[0] * x[:, 0:1]).add_(x[:, 1:2], alpha=_LUMA[1]).add_(x[:, 2:3], alpha=_LUMA[2])


__all__ = ["DeviceAugment", "augment_batches", "adjust_hue"]
