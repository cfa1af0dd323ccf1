"""Binary attributes, eyeglasses and valence / arousal of the procedural synthetic faces.

The embedded default of the attribute and affect evaluations (CelebA's and AffectNet's stand-ins).
Every value is read off the parameters the face is drawn with, so it is visible in the image:

* expression geometry (the 7 expression parameters after intensity and jitter): ``Smiling``
  (mouth curve > 0.5), ``Mouth_Slightly_Open`` (mouth opening > 0.25), ``Narrow_Eyes`` (eye
  opening < -0.2), ``Raised_Eyebrows`` (brow raise > 0.4), ``Frowning`` (brow tilt < -0.4, where
  the renderer draws frown lines);
* the person: ``Bald``, ``Bangs`` (fringe), ``Long_Hair``, ``Black_Hair`` / ``Brown_Hair`` /
  ``Blond_Hair`` / ``Gray_Hair`` (the hair colour's palette entry, not bald), ``Pale_Skin`` (mean
  skin RGB > 215);
* the scene: ``Blurry`` (the Gaussian blur draw), ``Head_Turned`` (|yaw| > 0.2, about half the
  range), ``Head_Tilted`` (|roll| > 12 degrees);
* ``Eyeglasses`` when the dataset draws glasses (``SyntheticFaces.glasses`` > 0: each image wears
  them with that probability, from its own random stream, so the other draws and every image
  without glasses are unchanged).

Names follow CelebA where CelebA has the attribute. Left/right pose bins are deliberately absent:
the reference's horizontal-flip augmentation would make them unlearnable.

The scene values come from replaying the renderer's first draws on an equally seeded generator
(:func:`scene_draws`, no rendering); ``tests/test_synthetic_attributes.py`` holds the replay to the
renderer (roll from the eye line of the rendered landmarks, blur from the blur call).

Valence / arousal (ours; the generator has no affect model): each expression has a point on
Russell's circumplex, :data:`AFFECT_PROTOTYPES`, scaled by the image's expression strength relative
to the top of its range, ``u / intensity[1]`` (so weaker expressions lie nearer the centre):
continuous targets in [-1, 1] that vary within a class.
"""
from __future__ import annotations

import copy
import math

import numpy as np
from PIL import Image, ImageDraw

from fra.data.synthetic_render import EXPRESSIONS, expression_params

ATTRIBUTES: tuple[str, ...] = (
    "Smiling", "Mouth_Slightly_Open", "Narrow_Eyes", "Raised_Eyebrows", "Frowning", "Bald", "Bangs", "Long_Hair",
    "Black_Hair", "Brown_Hair", "Blond_Hair", "Gray_Hair", "Pale_Skin", "Blurry", "Head_Turned", "Head_Tilted")
GLASSES_ATTRIBUTE = "Eyeglasses"
TARGETS: tuple[str, ...] = ("valence", "arousal")

# (valence, arousal) at full strength, indexed like EXPRESSIONS (ours, after Russell's circumplex).
AFFECT_PROTOTYPES = np.array([
    [0.0, -0.3],  # neutral: calm
    [0.8, 0.4],  # happy
    [-0.7, -0.4],  # sad
    [0.3, 0.8],  # surprise
    [-0.6, 0.7],  # fear
    [-0.7, 0.3],  # disgust
    [-0.7, 0.6],  # anger
])
assert AFFECT_PROTOTYPES.shape == (len(EXPRESSIONS), 2)

# The hair palette of synthetic_render.identity (black, dark brown, brown, blond, red, grey).
_HAIR_PALETTE = np.array([[28, 24, 22], [70, 46, 30], [118, 80, 46], [212, 178, 112], [158, 68, 34],
                          [168, 166, 160]], np.float64)
_HAIR_NAMES = {0: "Black_Hair", 1: "Brown_Hair", 2: "Brown_Hair", 3: "Blond_Hair", 5: "Gray_Hair"}


def attribute_names(glasses: bool) -> tuple[str, ...]:
    return ATTRIBUTES + ((GLASSES_ATTRIBUTE,) if glasses else ())


def scene_draws(expression: int, rng: np.random.Generator, intensity: tuple[float, float], jitter: float) -> dict:
    """The renderer's first draws from ``rng`` (in its order): expression strength ``u`` and
    parameters, roll (radians), scale, shift, yaw, light, and whether the image is blurred.

    ``u`` is read from a copy of the generator: :func:`expression_params` draws it first.
    """
    u = float(copy.deepcopy(rng).uniform(intensity[0], intensity[1]))
    params = expression_params(expression, rng, intensity, jitter)
    roll = math.radians(rng.uniform(-25.0, 25.0))
    scale = rng.uniform(0.8, 1.15)
    shift = rng.uniform(-0.1, 0.1, 2)
    yaw = rng.uniform(-0.4, 0.4)
    rng.uniform(0, 2 * math.pi), rng.uniform(0.2, 1.1), rng.uniform(0.35, 0.6)  # light: azimuth, elevation, ambient
    blur = bool(rng.random() < 0.3)
    return {"u": u, "params": params, "roll": roll, "scale": scale, "shift": shift, "yaw": yaw, "blur": blur}


def hair_index(colour) -> int:
    """Palette entry of a hair colour drawn as ``palette * U(0.85, 1.15) + N(0, 6)``: the entry
    nearest to the colour after the best scale in that range."""
    c = np.asarray(colour, np.float64)
    s = np.clip(_HAIR_PALETTE @ c / (_HAIR_PALETTE ** 2).sum(1), 0.85, 1.15)
    return int(np.argmin(((c[None] - s[:, None] * _HAIR_PALETTE) ** 2).sum(1)))


def attributes(ident: dict, scene: dict, wears_glasses: bool | None) -> tuple[float, ...]:
    """0/1 flags in :func:`attribute_names` order (``wears_glasses`` None: no Eyeglasses flag)."""
    curve, mopen, _, braise, btilt, eopen, _ = (float(v) for v in scene["params"])
    style = ident["hair_style"]
    hair = _HAIR_NAMES.get(hair_index(ident["hair_color"])) if style != "bald" else None
    flags = {
        "Smiling": curve > 0.5, "Mouth_Slightly_Open": mopen > 0.25, "Narrow_Eyes": eopen < -0.2,
        "Raised_Eyebrows": braise > 0.4, "Frowning": btilt < -0.4, "Bald": style == "bald",
        "Bangs": style == "fringe", "Long_Hair": style == "long", "Black_Hair": hair == "Black_Hair",
        "Brown_Hair": hair == "Brown_Hair", "Blond_Hair": hair == "Blond_Hair", "Gray_Hair": hair == "Gray_Hair",
        "Pale_Skin": float(np.mean(ident["skin"])) > 215.0, "Blurry": scene["blur"],
        "Head_Turned": abs(scene["yaw"]) > 0.2, "Head_Tilted": abs(scene["roll"]) > math.radians(12.0),
    }
    out = [float(flags[name]) for name in ATTRIBUTES]
    if wears_glasses is not None:
        out.append(float(wears_glasses))
    return tuple(out)


def valence_arousal(expression: int, scene: dict, intensity: tuple[float, float]) -> tuple[float, float]:
    """(valence, arousal): the expression's prototype scaled by ``u / intensity[1]``."""
    strength = scene["u"] / intensity[1] if intensity[1] > 0 else 0.0
    v, a = np.clip(AFFECT_PROTOTYPES[int(expression)] * strength, -1.0, 1.0)
    return float(v), float(a)


def glasses_draw(seed: int, identity_id: int, index: int, probability: float) -> bool:
    """Whether image (identity, index) wears glasses: its own stream, independent of the render's."""
    if probability <= 0:
        return False
    rng = np.random.default_rng(np.random.SeedSequence([seed, identity_id, index], spawn_key=(3,)))
    return bool(rng.random() < probability)


def draw_glasses(image: np.ndarray, eyes: np.ndarray, ss: int = 4) -> np.ndarray:
    """Glasses drawn over a rendered face: a dark round rim around each eye, a bridge and the
    temples towards the ears, placed and sized by the two eye landmarks (so they follow roll,
    scale and shift), drawn at ``ss``x and box-filtered down. The part mask is not changed (the
    frame is not a face part). They are drawn after the scene's blur and noise, so they look
    sharper than the face.

    Args:
        image: uint8 (S, S, 3).
        eyes: (2, 2) pixel coordinates of the image-left and image-right eye.
    """
    size = image.shape[0]
    left, right = np.asarray(eyes, np.float64)[:2]
    axis = right - left
    dist = float(np.hypot(*axis))
    if dist < 1e-6:
        return image
    unit = axis / dist
    r, width = 0.42 * dist, max(1, int(round(0.07 * dist * ss)))
    overlay = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(overlay)

    def px(p):
        return tuple(float(v) * ss + (ss - 1) / 2 for v in p)

    for centre in (left, right):
        x, y = px(centre)
        draw.ellipse((x - r * ss, y - 0.8 * r * ss, x + r * ss, y + 0.8 * r * ss), outline=255, width=width)
    draw.line(px(left + unit * r) + px(right - unit * r), fill=255, width=width)  # bridge
    draw.line(px(left - unit * r) + px(left - unit * 1.1 * dist), fill=255, width=width)  # temples
    draw.line(px(right + unit * r) + px(right + unit * 1.1 * dist), fill=255, width=width)
    alpha = np.asarray(overlay.reduce(ss), np.float32)[..., None] / 255.0
    frame = np.array([22.0, 20.0, 24.0], np.float32)
    return np.clip(image.astype(np.float32) * (1 - alpha) + frame * alpha, 0, 255).astype(np.uint8)


__all__ = ["ATTRIBUTES", "GLASSES_ATTRIBUTE", "TARGETS", "AFFECT_PROTOTYPES", "attribute_names", "scene_draws",
           "hair_index", "attributes", "valence_arousal", "glasses_draw", "draw_glasses"]
