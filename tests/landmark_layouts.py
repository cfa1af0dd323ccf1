"""Tiny face-alignment trees in their official layouts (WFLW, 300W, AFLW-19), with bad rows.

Each builder writes real face JPEGs (64 px LFW faces from :mod:`tests.data_layouts`), annotation
files in the official format, and the defects real data has: a wrong point count, a missing
image, a box outside the image, an unparsable flag, a corrupt or truncated image. It returns
an :class:`Expected` whose ``good`` maps split -> {path: (landmarks, box, attributes)} with the
values a correct reader must store (0-based pixels), and ``skipped`` maps path -> reason.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.data_layouts import CORRUPT, Expected, _write, face_jpeg, truncated_jpeg

SIZE = 64


def ring(n: int, k: int, cx: float = 32.0, cy: float = 33.0) -> np.ndarray:
    """(n, 2) points on an ellipse inside a 64 px image, different for each k."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False) + 0.1 * k
    return np.round(np.column_stack([cx + (14 + k) * np.cos(t), cy + (18 - k) * np.sin(t)]), 3)


def _fmt(v: float) -> str:
    return f"{v:.3f}"


def build_wflw(root: Path) -> Expected:
    exp = Expected()
    ann = root / "WFLW_annotations/list_98pt_rect_attr_train_test"
    k = 0
    for split in ("train", "test"):
        lines = []
        for j in range(4):
            image = f"{j}--Event/{split}_{j}.jpg"
            _write(root / "WFLW_images" / image, face_jpeg(k))
            faces = 2 if j == 0 else 1  # the first image holds two faces: two lines, two records
            for f in range(faces):
                pts = ring(98, k + f)
                box = (4 + f, 5, 58, 60 - f)
                flags = tuple(float(v) for v in ((j + np.arange(6) + f) % 3 == 0))
                lines.append(" ".join([*map(_fmt, pts.ravel()), *(str(int(b)) for b in box),
                                       *(str(int(v)) for v in flags), image]))
                path = f"WFLW_images/{image}" + (f"#face{f}" if f else "")
                exp.good.setdefault(split, {})[path] = (tuple(pts.ravel()), tuple(float(b) for b in box), flags)
            k += 1
        if split == "train":
            good_pts = " ".join(map(_fmt, ring(98, 0).ravel()))
            bad = [
                ("9--Bad/short.jpg", face_jpeg(1), " ".join(map(_fmt, ring(97, 0).ravel())) + " 4 5 58 60 0 0 0 0 0 0",
                 "bad_annotation"),
                ("9--Bad/flag.jpg", face_jpeg(2), good_pts + " 4 5 58 60 0 2 0 0 0 0", "bad_annotation"),
                ("9--Bad/gone.jpg", None, good_pts + " 4 5 58 60 0 0 0 0 0 0", "missing"),
                ("9--Bad/outside.jpg", face_jpeg(3), good_pts + " 70 80 120 140 0 0 0 0 0 0", "box_outside"),
                ("9--Bad/corrupt.jpg", CORRUPT, good_pts + " 4 5 58 60 0 0 0 0 0 0", "corrupt"),
            ]
            for image, data, fields, reason in bad:
                if data is not None:
                    _write(root / "WFLW_images" / image, data)
                lines.append(f"{fields} {image}")
                exp.skipped[f"WFLW_images/{image}"] = reason
        _write(ann / f"list_98pt_rect_attr_{split}.txt", ("\n".join(lines) + "\n").encode())
    return exp


def pts_text(points: np.ndarray, declared: int | None = None) -> str:
    body = "\n".join(f"{x:.3f} {y:.3f}" for x, y in points)
    return f"version: 1\nn_points:  {declared or len(points)}\n{{\n{body}\n}}\n"


def build_300w(root: Path) -> Expected:
    exp = Expected()
    layout = {"train": ["afw", "afw", "helen/trainset", "lfpw/trainset"],
              "test": ["helen/testset", "lfpw/testset", "ibug", "ibug"]}
    k = 0
    for split, folders in layout.items():
        for folder in folders:
            stem = f"image_{k:03d}_01"
            pts = ring(68, k) + 1.0  # .pts files are 1-based
            image = f"{folder}/{stem}.jpg"
            if folder == "ibug" and k % 2:  # iBUG's file named with a space before "_01"
                image = f"{folder}/image_{k:03d} _01.jpg"
            ext = ".png" if folder == "afw" and k == 1 else ".jpg"
            image = image[:-4] + ext
            _write(root / image, face_jpeg(k))
            _write(root / f"{folder}/{stem}.pts", pts_text(pts).encode())
            marks = pts - 1.0
            box = (marks[:, 0].min(), marks[:, 1].min(), marks[:, 0].max(), marks[:, 1].max())
            flags = (float(folder in ("helen/testset", "lfpw/testset")), float(folder == "ibug"))
            exp.good.setdefault(split, {})[image] = (tuple(marks.ravel()), box, flags)
            k += 1
    _write(root / "afw/image_900.jpg", face_jpeg(5))
    _write(root / "afw/image_900.pts", pts_text(ring(67, 0)).encode())
    _write(root / "afw/image_901.jpg", face_jpeg(6))
    _write(root / "afw/image_901.pts", pts_text(ring(68, 0), declared=67).encode())
    _write(root / "lfpw/trainset/image_902.pts", pts_text(ring(68, 0)).encode())
    _write(root / "helen/trainset/image_903.jpg", face_jpeg(7))
    _write(root / "helen/trainset/image_903.pts", pts_text(ring(68, 0) + 200).encode())
    _write(root / "ibug/image_904.jpg", truncated_jpeg(8))
    _write(root / "ibug/image_904.pts", pts_text(ring(68, 0)).encode())
    _write(root / "ibug/notes.txt", b"an image without a .pts is not annotated; a text file is ignored")
    exp.skipped.update({"afw/image_900.jpg": "bad_annotation", "afw/image_901.jpg": "bad_annotation",
                        "lfpw/trainset/image_902.pts": "missing", "helen/trainset/image_903.jpg": "box_outside",
                        "ibug/image_904.jpg": "truncated"})
    return exp


def build_aflw19(root: Path, train_count: int = 6) -> Expected:
    """10 faces: ra puts 6 in train (1 missing, 1 NaN), 4 in test (1 box outside); returns train_count too."""
    from scipy.io import savemat

    exp = Expected()
    n = 10
    names, data, bbox, mask = [], np.zeros((n, 38)), np.zeros((n, 4)), np.ones((n, 19))
    for i in range(n):
        names.append(f"{i % 3 if i % 3 != 1 else 2}/image{i:05d}.jpg")
        pts = ring(19, i)
        data[i, :19], data[i, 19:] = pts[:, 0], pts[:, 1]
        bbox[i] = (6 + i % 2, 58, 7, 59)  # left, right, top, bottom
        if i % 4 == 1:
            mask[i, 3] = 0  # a hidden point: not frontal
    ra = np.array([3, 7, 1, 9, 5, 10, 2, 8, 4, 6])  # 1-based
    data[6, 4] = np.nan  # face 7 (train) -> bad_annotation
    bbox[3] = (80, 130, 90, 140)  # face 4 (test) -> box_outside
    for pos, i in enumerate(ra - 1):
        split = "train" if pos < train_count else "test"
        path = f"data/flickr/{names[i]}"
        if i == 2:  # face 3 (train): listed, no image
            exp.skipped[path] = "missing"
            continue
        _write(root / path, face_jpeg(i))
        if i == 6:
            exp.skipped[path] = "bad_annotation"
        elif i == 3:
            exp.skipped[path] = "box_outside"
        else:
            left, right, top, bottom = bbox[i]
            marks = np.column_stack([data[i, :19], data[i, 19:]]).ravel()
            exp.good.setdefault(split, {})[path] = (tuple(marks), (left, top, right, bottom),
                                                    (float(mask[i].all()),))
    cell = np.empty((n, 1), dtype=object)
    for i, name in enumerate(names):
        cell[i, 0] = name
    savemat(root / "AFLWinfo_release.mat", {"bbox": bbox, "data": data, "mask_new": mask, "nameList": cell,
                                            "ra": ra[None, :].astype(np.float64)})
    return exp


LANDMARK_BUILDERS = {"wflw": build_wflw, "300w": build_300w, "aflw19": build_aflw19}
