"""Tiny dataset trees in each official layout, with the defects real data has.

Every builder writes real face JPEGs (LFW faces from scikit-image, upscaled) plus a corrupt file,
a truncated JPEG, an unknown label and (where a label file can reference one) a missing image,
and returns an :class:`Expected` with what a correct reader must produce.
"""
from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fra.data.decode import encode_jpeg, encode_png


@dataclass
class Expected:
    """good: {split: {path: label}}; skipped: {path: reason}; excluded: {split: n}."""

    good: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    excluded: dict = field(default_factory=dict)

    def add(self, split: str, path: str, label: int) -> None:
        self.good.setdefault(split, {})[path] = label

    def total(self) -> int:
        return sum(len(v) for v in self.good.values())


@functools.lru_cache(maxsize=1)
def lfw_faces() -> np.ndarray:
    """The 100 LFW faces of ``skimage.data.lfw_subset()`` as uint8 (100, 25, 25)."""
    from skimage.data import lfw_subset

    return (lfw_subset()[:100] * 255).round().astype(np.uint8)


@functools.lru_cache(maxsize=512)
def face_rgb(i: int, size: int = 64) -> np.ndarray:
    """Face ``i % 100`` upscaled to ``size`` and tinted per index, uint8 (size, size, 3)."""
    grey = Image.fromarray(lfw_faces()[i % 100]).resize((size, size), Image.BICUBIC)
    rgb = np.asarray(grey.convert("RGB"), np.float32)
    tint = 0.85 + 0.3 * np.random.default_rng(i).random(3)
    return np.clip(rgb * tint, 0, 255).astype(np.uint8)


def face_jpeg(i: int, size: int = 64) -> bytes:
    return encode_jpeg(face_rgb(i, size), quality=90)


def truncated_jpeg(i: int = 0) -> bytes:
    data = face_jpeg(i)
    return data[: len(data) // 2]


CORRUPT = b"\xff\xd8\xff\xe0 this is not really a jpeg" + bytes(range(256)) * 4


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def build_rafdb(root: Path, n_train: int = 14, n_test: int = 6) -> Expected:
    exp, lines, k = Expected(), [], 0
    for split, n in (("train", n_train), ("test", n_test)):
        for j in range(1, n + 1):
            name = f"{split}_{j:05d}"
            label = k % 7
            lines.append(f"{name}.jpg {label + 1}")
            rel = f"Image/aligned/{name}_aligned.jpg"
            _write(root / rel, face_jpeg(k))
            exp.add(split, rel, label)
            k += 1
    # defects (all in train)
    bad = {"train_09001": ("corrupt", CORRUPT, 1), "train_09002": ("truncated", truncated_jpeg(3), 2),
           "train_09003": ("unknown_label", face_jpeg(5), 9), "train_09004": ("missing", None, 4)}
    for name, (reason, data, value) in bad.items():
        lines.append(f"{name}.jpg {value}")
        rel = f"Image/aligned/{name}_aligned.jpg"
        if data is not None:
            _write(root / rel, data)
        exp.skipped[rel] = reason
    _write(root / "EmoLabel/list_patition_label.txt", ("\n".join(lines) + "\n").encode())
    return exp


def build_vggface2(root: Path, ids=("n000001", "n000002", "n000003"), per_id: int = 5) -> Expected:
    exp, k = Expected(), 0
    splits = {"train": ids[:2], "test": ids[2:]}
    meta = ["Class_ID, Name, Sample_Num, Flag, Gender"]
    boxes = {"train": ["NAME_ID,X,Y,W,H"], "test": ["NAME_ID,X,Y,W,H"]}
    for split, idents in splits.items():
        for label, ident in enumerate(idents):
            meta.append(f'{ident}, "Person {ident}", {per_id}, {int(split == "train")}, m')
            for j in range(per_id):
                rel = f"{split}/{ident}/{j:04d}_01.jpg"
                _write(root / rel, face_jpeg(k))
                boxes[split].append(f'"{ident}/{j:04d}_01",{4 + j},5,40,50')
                exp.add(split, rel, label)
                k += 1
    _write(root / "train/n000001/0099_01.jpg", CORRUPT)
    _write(root / "train/n000002/0098_01.jpg", truncated_jpeg(7))
    exp.skipped.update({"train/n000001/0099_01.jpg": "corrupt", "train/n000002/0098_01.jpg": "truncated"})
    # an identity folder missing from identity_meta.csv -> unknown label. It sorts last, so the
    # labels of the known identities do not move.
    _write(root / "train/n999999/0001_01.jpg", face_jpeg(50))
    exp.skipped["train/n999999/0001_01.jpg"] = "unknown_label"
    _write(root / "meta/identity_meta.csv", ("\n".join(meta) + "\n").encode())
    for split, rows in boxes.items():
        _write(root / f"bb_landmark/loose_bb_{split}.csv", ("\n".join(rows) + "\n").encode())
    return exp


AFFECT_HEADER = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
                 "expression", "valence", "arousal"]


def build_affectnet(root: Path, num_classes: int = 7) -> Expected:
    exp, k = Expected(), 0
    for split, fname, codes in (("train", "training.csv", list(range(11)) * 2), ("val", "validation.csv", list(range(11)))):
        rows = []
        for code in codes:
            rel = f"{k // 10 + 1}/img{k:04d}.jpg"
            _write(root / "Manually_Annotated_Images" / rel, face_jpeg(k))
            marks = ";".join(f"{v:.1f}" for v in np.linspace(1, 60, 136))
            rows.append([rel, 2, 3, 50, 55, marks, code, 0.1, -0.2])
            if code < num_classes:
                exp.add(split, f"Manually_Annotated_Images/{rel}", code)
            else:
                exp.excluded[split] = exp.excluded.get(split, 0) + 1
            k += 1
        if split == "train":
            for rel, data, code, reason in (("9/bad.jpg", CORRUPT, 1, "corrupt"), ("9/trunc.jpg", truncated_jpeg(1), 2, "truncated"),
                                            ("9/unknown.jpg", face_jpeg(2), "x", "unknown_label"),
                                            ("9/gone.jpg", None, 3, "missing")):
                if data is not None:
                    _write(root / "Manually_Annotated_Images" / rel, data)
                rows.append([rel, 0, 0, 10, 10, "", code, 0, 0])
                exp.skipped[f"Manually_Annotated_Images/{rel}"] = reason
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(AFFECT_HEADER)
        w.writerows(rows)
        _write(root / "Manually_Annotated_file_lists" / fname, buf.getvalue().encode())
    return exp


def build_ferplus(root: Path) -> Expected:
    exp, k = Expected(), 0
    votes_for = {  # label -> votes (neutral .. contempt, unknown, NF)
        0: [8, 1, 1, 0, 0, 0, 0, 0, 0, 0], 1: [0, 10, 0, 0, 0, 0, 0, 0, 0, 0], 3: [2, 0, 0, 6, 2, 0, 0, 0, 0, 0],
        7: [0, 0, 0, 0, 2, 0, 0, 6, 1, 1],
    }
    no_majority = [4, 4, 2, 0, 0, 0, 0, 0, 0, 0]
    for split, folder in (("train", "FER2013Train"), ("val", "FER2013Valid"), ("test", "FER2013Test")):
        rows = []
        for label, votes in votes_for.items():
            name = f"fer{k:07d}.png"
            _write(root / f"Images/{folder}/{name}", encode_png(face_rgb(k, 48)[..., 0]))
            rows.append([name, "(0, 0, 48, 48)", *votes])
            exp.add(split, f"Images/{folder}/{name}", label)
            k += 1
        name = f"fer{k:07d}.png"
        _write(root / f"Images/{folder}/{name}", encode_png(face_rgb(k, 48)[..., 0]))
        rows.append([name, "(0, 0, 48, 48)", *no_majority])
        exp.excluded[split] = 1
        k += 1
        if split == "train":
            png = encode_png(face_rgb(1, 48)[..., 0])
            _write(root / f"Images/{folder}/trunc.png", png[: len(png) // 2])
            _write(root / f"Images/{folder}/badvotes.png", png)
            rows += [["trunc.png", "(0, 0, 48, 48)", *votes_for[1]], ["gone.png", "(0, 0, 48, 48)", *votes_for[1]],
                     ["badvotes.png", "(0, 0, 48, 48)", "x", 1, 2]]
            exp.skipped.update({f"Images/{folder}/trunc.png": "truncated", f"Images/{folder}/gone.png": "missing",
                                f"Images/{folder}/badvotes.png": "unknown_label"})
        buf = io.StringIO()
        csv.writer(buf).writerows(rows)
        _write(root / f"Labels/{folder}/label.csv", buf.getvalue().encode())
    return exp


def build_fer2013(root: Path) -> Expected:
    exp = Expected()
    rows = []
    usage = ["Training"] * 9 + ["PublicTest"] * 3 + ["PrivateTest"] * 3
    split_of = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
    for i, u in enumerate(usage):
        pixels = " ".join(str(int(v)) for v in face_rgb(i, 48)[..., 0].ravel())
        rows.append([i % 7, pixels, u])
        exp.add(split_of[u], f"fer2013.csv#{i}", i % 7)
    rows.append([8, rows[0][1], "Training"])
    exp.skipped[f"fer2013.csv#{len(rows) - 1}"] = "unknown_label"
    rows.append([2, "1 2 3", "Training"])
    exp.skipped[f"fer2013.csv#{len(rows) - 1}"] = "corrupt"
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["emotion", "pixels", "Usage"])
    w.writerows(rows)
    _write(root / "fer2013.csv", buf.getvalue().encode())
    return exp


def build_image_folder(root: Path, classes=("cat", "dog", "face"), per_class: int = 4, splits=("train", "test")) -> Expected:
    exp, k = Expected(), 0
    for split in splits:
        for label, cls in enumerate(classes):
            for j in range(per_class):
                rel = f"{split}/{cls}/{j}.jpg"
                _write(root / rel, face_jpeg(k))
                exp.add(split, rel, label)
                k += 1
    _write(root / f"{splits[0]}/{classes[0]}/broken.jpg", CORRUPT)
    _write(root / f"{splits[0]}/{classes[-1]}/half.jpg", truncated_jpeg(2))
    (root / f"{splits[0]}/notes.txt").write_text("not an image, ignored")
    exp.skipped.update({f"{splits[0]}/{classes[0]}/broken.jpg": "corrupt", f"{splits[0]}/{classes[-1]}/half.jpg": "truncated"})
    return exp


BUILDERS = {
    "rafdb": build_rafdb,
    "vggface2": build_vggface2,
    "affectnet7": functools.partial(build_affectnet, num_classes=7),
    "affectnet8": functools.partial(build_affectnet, num_classes=8),
    "ferplus": build_ferplus,
    "fer2013": build_fer2013,
    "image_folder": build_image_folder,
}


CELEBA_ATTRIBUTES = (  # the release's header, in its order (DOWNSTREAM_SPEC §1)
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones "
    "Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young").split()


def celeba_values(k: int) -> list[int]:
    """The -1/1 attribute row of image k (seeded)."""
    return [int(v) for v in np.where(np.random.default_rng(1000 + k).random(40) < 0.3, 1, -1)]


def build_celeba(root: Path, counts=(("train", 0, 8), ("val", 1, 3), ("test", 2, 4))) -> Expected:
    """CelebA's official layout; ``exp.attributes`` maps each good path to its 0/1 flags.

    Defects: a row with 39 values (malformed), a 0 and a 2 among the values (unknown_label), a
    row listed twice (duplicate: the second), a listed image that does not exist (missing), a
    corrupt and a truncated JPEG, an attribute row with no partition line and one whose
    partition code is 5 (both under the split ``unassigned``), a partition line without an
    attribute row (unlabelled).
    """
    exp, attr_rows, part_rows, k = Expected(), [], [], 0
    exp.attributes = {}
    for split, code, n in counts:
        for _ in range(n):
            name = f"{k + 1:06d}.jpg"
            values = celeba_values(k)
            _write(root / "img_align_celeba" / name, face_jpeg(k))
            attr_rows.append(f"{name} " + " ".join(f"{v:2d}" for v in values))
            part_rows.append(f"{name} {code}")
            exp.add(split, f"img_align_celeba/{name}", -1)
            exp.attributes[f"img_align_celeba/{name}"] = [float((v + 1) // 2) for v in values]
            k += 1
    good_row = attr_rows[0]
    defects = [  # name, image bytes, attribute row (None: no row), partition code (None: no line), reason
        ("900001.jpg", face_jpeg(1), " ".join(["1"] * 39), 0, "malformed"),
        ("900002.jpg", face_jpeg(2), " ".join(["1"] * 20 + ["0"] + ["-1"] * 19), 0, "unknown_label"),
        ("900003.jpg", face_jpeg(3), " ".join(["-1"] * 39 + ["2"]), 2, "unknown_label"),
        ("900004.jpg", None, " ".join(["1"] * 40), 1, "missing"),
        ("900005.jpg", CORRUPT, " ".join(["1"] * 40), 0, "corrupt"),
        ("900006.jpg", truncated_jpeg(4), " ".join(["-1"] * 40), 2, "truncated"),
        ("900007.jpg", face_jpeg(5), " ".join(["1"] * 40), None, "no_partition"),
        ("900008.jpg", face_jpeg(6), " ".join(["1"] * 40), 5, "bad_partition"),
        ("900009.jpg", face_jpeg(7), None, 0, "unlabelled"),
    ]
    for name, data, row, code, reason in defects:
        if data is not None:
            _write(root / "img_align_celeba" / name, data)
        if row is not None:
            attr_rows.append(f"{name} {row}")
        if code is not None:
            part_rows.append(f"{name} {code}")
        exp.skipped[f"img_align_celeba/{name}"] = reason
    attr_rows.append(good_row)  # 000001.jpg again: the second row is a duplicate
    exp.skipped["img_align_celeba/000001.jpg"] = "duplicate"
    header = f"{len(attr_rows)}\n" + " ".join(CELEBA_ATTRIBUTES) + " \n"
    _write(root / "list_attr_celeba.txt", (header + "\n".join(attr_rows) + "\n").encode())
    _write(root / "list_eval_partition.txt", ("\n".join(part_rows) + "\n").encode())
    return exp


BUILDERS["celeba"] = build_celeba


def build_affectnet_va(root: Path) -> Expected:
    """AffectNet's layout for the valence/arousal card: the affectnet8 tree plus training rows with
    distinct valence/arousal (``exp.targets``), one not annotated (-2) and one unparsable, both
    skipped as unknown_target."""
    exp = build_affectnet(root, num_classes=8)
    exp.targets = {p: (0.1, -0.2) for d in exp.good.values() for p in d}
    csv_path = root / "Manually_Annotated_file_lists" / "training.csv"
    rows = []
    for j, (code, v, a) in enumerate([(1, 0.75, 0.5), (2, -0.6, -0.35), (4, -0.25, 0.9), (0, 0.0, -1.0)]):
        rel = f"va/{j}.jpg"
        _write(root / "Manually_Annotated_Images" / rel, face_jpeg(50 + j))
        rows.append([rel, 1, 1, 40, 40, "", code, v, a])
        exp.add("train", f"Manually_Annotated_Images/{rel}", code)
        exp.targets[f"Manually_Annotated_Images/{rel}"] = (v, a)
    for rel, v, a in (("va/unannotated.jpg", -2, -2), ("va/garbled.jpg", "n/a", 0.3)):
        _write(root / "Manually_Annotated_Images" / rel, face_jpeg(60))
        rows.append([rel, 1, 1, 40, 40, "", 3, v, a])
        exp.skipped[f"Manually_Annotated_Images/{rel}"] = "unknown_target"
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    with open(csv_path, "a", newline="") as fh:
        fh.write(buf.getvalue())
    return exp


BUILDERS["affectnet_va"] = build_affectnet_va
