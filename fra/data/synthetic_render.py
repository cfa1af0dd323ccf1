"""Drawing one procedural face: identity parameters, the expression table, the head geometry.

The head is described in *face units*: the origin is the centre of the face ellipse, x points
to the image right, y points down, and the face half-width is about 1. Every shape is a
polygon in face units; :class:`Canvas` maps it through one affine (pose) into a supersampled
RGB layer and a label layer at the same time, so pixels, part masks and landmarks can never
disagree. The scene (background, lighting, noise) is assembled in :mod:`fra.data.synthetic`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from fra.errors import DataError

EXPRESSIONS: tuple[str, ...] = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger")
PARTS: tuple[str, ...] = ("background", "skin", "brows", "eyes", "nose", "mouth", "hair")
# ArcFace / MTCNN order; "left" means image-left (the person's right), as in the ArcFace template.
LANDMARKS: tuple[str, ...] = ("left_eye", "right_eye", "nose_tip", "mouth_left", "mouth_right")
# The dense set: the 68 points of the iBUG / 300W scheme (0-based; 0-16 jaw from image-left, 17-21 and
# 22-26 brows, 27-30 nose bridge, 31-35 nostril base, 36-41 and 42-47 eyes, 48-59 outer and 60-67
# inner lip), placed on the same parametric shapes the face is drawn with.
IBUG68_FLIP_PAIRS: tuple[tuple[int, int], ...] = (
    (0, 16), (1, 15), (2, 14), (3, 13), (4, 12), (5, 11), (6, 10), (7, 9), (17, 26), (18, 25), (19, 24),
    (20, 23), (21, 22), (31, 35), (32, 34), (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),
    (48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67))

# Clothes get their own label while drawing (they must be opaque in the face layer) and are folded
# into background when the mask is returned.
CLOTHES_LABEL = 7

# Columns: mouth_curve (corners up +), mouth_open (<0 presses the lips), mouth_width, brow_raise,
# brow_tilt (inner ends up +), eye_open, lip_raise (one-sided upper-lip curl). Row = EXPRESSIONS.
EXPRESSION_TABLE = np.array(
    [
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # neutral
        [1.0, 0.4, 0.3, 0.1, 0.0, -0.3, 0.0],  # happy: broad smile with teeth, squint
        [-0.9, -0.2, -0.1, 0.0, 1.0, -0.35, 0.0],  # sad: corners down, inner brows up
        [0.0, 1.0, -0.4, 1.0, 0.15, 0.7, 0.0],  # surprise: round O, wide eyes, high brows
        [-0.35, 0.55, 0.4, 0.75, 0.9, 0.5, 0.0],  # fear: stretched half-open mouth, inner-up brows
        [-0.4, 0.1, 0.0, -0.35, -0.35, -0.4, 1.0],  # disgust: lip curl, nose wrinkles
        [-0.2, -0.7, -0.15, -0.6, -1.1, -0.05, 0.0],  # anger: V brows, pressed lips
    ],
    dtype=np.float64,
)

_SKIN_STOPS = np.array(  # light -> dark
    [[250, 222, 200], [232, 188, 150], [196, 142, 100], [140, 94, 62], [82, 54, 38]], np.float64
)
_HAIR = np.array(  # black, dark brown, brown, blond, red, grey
    [[28, 24, 22], [70, 46, 30], [118, 80, 46], [212, 178, 112], [158, 68, 34], [168, 166, 160]],
    np.float64,
)
_IRIS = ((92, 58, 30), (60, 110, 170), (70, 120, 70), (130, 100, 50), (35, 25, 20))
_HAIR_STYLES = ("bald", "cap", "long", "fringe")

_CIRCLE = {n: (np.cos(np.linspace(0, 2 * np.pi, n, endpoint=False)),
               np.sin(np.linspace(0, 2 * np.pi, n, endpoint=False))) for n in (12, 16, 24, 36)}


def _rgb(v) -> tuple[int, int, int]:
    return tuple(int(c) for c in np.clip(np.rint(v), 0, 255))


def identity(seed: int) -> dict:
    """Fixed per-person parameters: face shape, skin, hair, eye / nose / mouth geometry, colours.

    Args:
        seed: non-negative integer; the same seed always gives the same person.

    Returns:
        A plain dict of floats, strings and RGB tuples (JSON-serialisable).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"identity seed must be a non-negative int, got {seed!r}")
    r = np.random.default_rng(int(seed))
    fw = r.uniform(0.88, 1.05)
    ratio = r.uniform(1.2, 1.42)
    t = r.uniform(0, 1) * (len(_SKIN_STOPS) - 1)
    i = min(int(t), len(_SKIN_STOPS) - 2)
    skin = _SKIN_STOPS[i] + (t - i) * (_SKIN_STOPS[i + 1] - _SKIN_STOPS[i]) + r.normal(0, 6, 3)
    hair = _HAIR[r.integers(len(_HAIR))] * r.uniform(0.85, 1.15) + r.normal(0, 6, 3)
    eye_y = r.uniform(-0.14, 0.0) * ratio
    nose_len = r.uniform(0.3, 0.42) * ratio
    lip_mix = r.uniform(0.35, 0.8)
    ident = {
        "seed": int(seed),
        "face_w": fw,
        "face_ratio": ratio,
        "jaw": r.uniform(2.0, 3.2),
        "skin": _rgb(skin),
        "hair_color": _rgb(hair),
        "hair_style": _HAIR_STYLES[r.choice(4, p=[0.2, 0.35, 0.25, 0.2])],
        "hair_len": r.uniform(1.3, 2.1),
        "hairline": r.uniform(0.55, 0.72),
        "eye_dx": r.uniform(0.34, 0.44) * fw,
        "eye_w": r.uniform(0.155, 0.2),
        "eye_hr": r.uniform(0.42, 0.56),
        "eye_y": eye_y,
        "iris": _IRIS[r.integers(len(_IRIS))],
        "nose_len": nose_len,
        "nose_w": r.uniform(0.1, 0.16),
        "mouth_y": eye_y + nose_len + r.uniform(0.22, 0.32) * ratio,
        "mouth_w": r.uniform(0.27, 0.36),
        "lip": r.uniform(0.06, 0.09),
        "brow": r.uniform(0.06, 0.09),
        "lip_color": _rgb((1 - lip_mix) * skin * 0.85 + lip_mix * np.array([175, 60, 70])),
        "clothes": _rgb(r.integers(20, 236, 3)),
        "curl_side": int(r.choice([-1, 1])),
        "ear": r.uniform(0.85, 1.15),
    }
    return ident


def expression_params(expression: int, rng: np.random.Generator, intensity: tuple[float, float],
                      jitter: float) -> np.ndarray:
    """``neutral + (class - neutral) * U(intensity) + N(0, jitter)``; always draws 8 numbers."""
    if not 0 <= int(expression) < len(EXPRESSIONS):
        raise DataError(f"expression must be in [0, {len(EXPRESSIONS)}), got {expression!r}")
    u = rng.uniform(intensity[0], intensity[1])
    noise = rng.normal(0.0, 1.0, EXPRESSION_TABLE.shape[1]) * jitter
    neutral = EXPRESSION_TABLE[0]
    return neutral + (EXPRESSION_TABLE[int(expression)] - neutral) * u + noise


class Canvas:
    """An RGB layer and a label layer drawn together through one affine ``p = A u + c``.

    Args:
        side: layer side in pixels (already supersampled).
        matrix: (2, 2) linear part mapping face units to pixels.
        offset: (2,) pixel position of the face-unit origin (pixel-centre convention).
        fill: RGB the colour layer starts with; it only matters as the colour that bilinear
            lighting bleeds in from at shape edges, so the caller passes the skin colour.
    """

    def __init__(self, side: int, matrix: np.ndarray, offset: np.ndarray, fill: tuple):
        self.marks: dict[str, np.ndarray] = {}  # named dense landmark groups, face units (see ibug68)
        self.rgb = Image.new("RGB", (side, side), fill)
        self.label = Image.new("L", (side, side), 0)
        self._drgb = ImageDraw.Draw(self.rgb)
        self._dlab = ImageDraw.Draw(self.label)
        (self._a, self._b), (self._c, self._d) = matrix.tolist()
        self._cx, self._cy = (float(v) for v in offset)

    def poly(self, xs, ys, colour: tuple, label: int) -> None:
        """Fill the polygon with vertices (xs[i], ys[i]) given in face units."""
        xs = np.asarray(xs, np.float64)
        ys = np.asarray(ys, np.float64)
        px = self._a * xs + self._b * ys + self._cx
        py = self._c * xs + self._d * ys + self._cy
        pts = np.column_stack((px, py)).ravel().tolist()
        self._drgb.polygon(pts, fill=colour)
        self._dlab.polygon(pts, fill=label)

    def ellipse(self, cx, cy, rx, ry, colour: tuple, label: int, n: int = 24) -> None:
        cos, sin = _CIRCLE[n]
        self.poly(cx + rx * cos, cy + ry * sin, colour, label)

    def band(self, xs, y_top, y_bottom, colour: tuple, label: int) -> None:
        """Fill between two curves sampled at the same xs (top edge left-to-right, back along bottom)."""
        xs = np.asarray(xs, np.float64)
        self.poly(np.concatenate([xs, xs[::-1]]),
                  np.concatenate([y_top, np.asarray(y_bottom, np.float64)[::-1]]), colour, label)


def _shade(colour: tuple, k: float) -> tuple[int, int, int]:
    return _rgb(np.asarray(colour, np.float64) * k)


def draw_head(cv: Canvas, ident: dict, p: np.ndarray, yaw: float) -> np.ndarray:
    """Draw clothes, hair, neck, ears, face and features; return (5, 2) landmarks in face units.

    Args:
        cv: the canvas to draw into.
        ident: parameters from :func:`identity`.
        p: (7,) expression parameters in EXPRESSION_TABLE column order.
        yaw: about -0.4..0.4; shifts the inner features sideways and narrows the far eye.
    """
    curve, mopen, mwidth, braise, btilt, eopen, lip_raise = (float(v) for v in p)
    fw, fh = ident["face_w"], ident["face_w"] * ident["face_ratio"]
    skin, hair, style = ident["skin"], ident["hair_color"], ident["hair_style"]
    dx = 0.22 * yaw * fw  # the inner features slide towards the side the head turns to

    cv.ellipse(0.0, fh + 1.35, 2.2, 1.05, ident["clothes"], CLOTHES_LABEL, n=36)
    if style == "long":
        t = np.linspace(np.pi, 2 * np.pi, 13)
        length = ident["hair_len"]
        xs = np.concatenate([[-fw * 1.22], fw * 1.18 * np.cos(t), [fw * 1.22]])
        ys = np.concatenate([[length], -0.05 + fh * 1.12 * np.sin(t), [length]])
        cv.poly(xs, ys, hair, 6)
    cv.poly([-0.42 * fw, 0.42 * fw, 0.5 * fw, -0.5 * fw], [0.4 * fh, 0.4 * fh, fh + 1.0, fh + 1.0],
            _shade(skin, 0.9), 1)
    ear_y = ident["eye_y"] + 0.16
    for sgn in (-1, 1):
        cv.ellipse(sgn * fw * 0.97, ear_y, 0.12 * ident["ear"], 0.22 * ident["ear"],
                   _shade(skin, 0.93), 1, n=16)

    # Face: an elliptic cranium on a superellipse jaw (exponent 2 = round, 3.2 = square).
    t = np.linspace(0.0, np.pi, 19)
    e = 2.0 / ident["jaw"]
    c, s = np.cos(t), np.sin(t)
    lower_x, lower_y = fw * np.sign(c) * np.abs(c) ** e, fh * s ** e
    cv.poly(np.concatenate([lower_x, -fw * c[1:-1]]), np.concatenate([lower_y, -fh * s[1:-1]]), skin, 1)
    tj = np.linspace(np.pi, 0.0, 17)  # iBUG 0-16: the jaw superellipse from image-left to image-right
    cj, sj = np.cos(tj), np.sin(tj)
    cv.marks["jaw"] = np.column_stack([fw * np.sign(cj) * np.abs(cj) ** e, fh * np.abs(sj) ** e])

    if style in ("cap", "long", "fringe"):
        _draw_hair_cap(cv, fw, fh, ident, style == "fringe")

    eye_pts = _draw_eyes_and_brows(cv, ident, dx, yaw, braise, btilt, eopen)
    nose_tip = _draw_nose(cv, ident, dx, yaw, lip_raise)
    mouth_pts = _draw_mouth(cv, ident, dx, curve, mopen, mwidth, lip_raise)
    if btilt < -0.4:  # frown lines between lowered brows
        for sgn in (-1, 1):
            x0 = dx + sgn * 0.045
            cv.poly([x0 - 0.01, x0 + 0.01, x0 + 0.01, x0 - 0.01],
                    [eye_pts[0, 1] - 0.24, eye_pts[0, 1] - 0.24, eye_pts[0, 1] - 0.1, eye_pts[0, 1] - 0.1],
                    _shade(skin, 0.72), 1)
    if curve > 0.45:  # cheek folds of a smile, from the nose wings towards the mouth corners
        for sgn, (mx, my) in zip((-1, 1), mouth_pts):
            xs = [nose_tip[0] + sgn * ident["nose_w"] * 1.2, mx + sgn * 0.07]
            ys = [nose_tip[1] - 0.02, my + 0.02]
            cv.poly(xs + [xs[1] + sgn * 0.018, xs[0] + sgn * 0.018], ys + [ys[1], ys[0]],
                    _shade(skin, 0.78), 1)
    return np.vstack([eye_pts, nose_tip[None], mouth_pts]).astype(np.float64)


def ibug68(marks: dict[str, np.ndarray]) -> np.ndarray:
    """The (68, 2) iBUG points, face units, from the groups :func:`draw_head` recorded on the canvas."""
    return np.vstack([marks["jaw"], marks["brow-1"], marks["brow+1"], marks["nose_bridge"], marks["nose_base"],
                      marks["eye-1"], marks["eye+1"], marks["lips"]]).astype(np.float64)


def _draw_hair_cap(cv: Canvas, fw: float, fh: float, ident: dict, fringe: bool) -> None:
    rx, ry, cy = fw * 1.07, fh * 1.1, -0.02
    t = np.linspace(np.pi * 0.94, np.pi * 2.06, 21)
    outer_x, outer_y = rx * np.cos(t), cy + ry * np.sin(t)
    temple_y = ident["eye_y"] - 0.12
    u = np.linspace(1.0, -1.0, 15)
    if fringe:
        ys = -fh * (ident["hairline"] - 0.1) + 0.05 * (np.arange(15) % 2)
        ys[0] = ys[-1] = temple_y
    else:
        ys = temple_y + (-fh * ident["hairline"] - temple_y) * np.sqrt(1.0 - u**2)
    # The hairline must stay inside both the outer contour (PIL fills even-odd, so a crossing cuts
    # a sliver out of the hair) and the face (or a gap opens at the temples).
    outer = rx * np.sqrt(np.clip(1.0 - ((ys - cy) / ry) ** 2, 0.0, None))
    face = fw * np.sqrt(np.clip(1.0 - (ys / fh) ** 2, 0.0, None))
    half_width = 0.97 * np.minimum(outer, face)
    cv.poly(np.concatenate([outer_x, u * half_width]), np.concatenate([outer_y, ys]), ident["hair_color"], 6)


def _draw_eyes_and_brows(cv: Canvas, ident: dict, dx: float, yaw: float, braise: float,
                         btilt: float, eopen: float) -> np.ndarray:
    ey, ehb = ident["eye_y"], ident["eye_w"] * ident["eye_hr"]
    openness = float(np.clip(1.0 + 0.6 * eopen, 0.3, 1.8))
    # Brows are darker than both hair and skin, so blond, grey, bald and dark-skinned people show them.
    brow_colour = _rgb(np.minimum(0.45 * np.asarray(ident["hair_color"]) + 0.55 * np.array([38, 28, 22]),
                                  0.6 * np.asarray(ident["skin"])))
    pts = []
    for sgn in (-1, 1):  # image-left eye first
        far = sgn * yaw > 0
        ew = ident["eye_w"] * ((1.0 - 0.45 * abs(yaw)) if far else (1.0 + 0.1 * abs(yaw)))
        ex = sgn * ident["eye_dx"] + dx
        eh = ehb * openness
        cv.ellipse(ex, ey, ew, eh, (240, 240, 234), 3)
        ix = ex + 0.35 * yaw * ew
        for r, colour in ((ehb * 0.95, ident["iris"]), (ehb * 0.42, (14, 12, 12))):
            cos, sin = _CIRCLE[16]
            xs = np.clip(ix + r * cos, ex - ew, ex + ew)
            bound = eh * np.sqrt(np.clip(1.0 - ((xs - ex) / ew) ** 2, 0.0, None))
            cv.poly(xs, np.clip(ey + r * sin, ey - bound, ey + bound), colour, 3)
        t = np.linspace(-1.08, 1.08, 11)
        lid = ey - eh * np.sqrt(np.clip(1.0 - t**2, 0.0, None))
        cv.band(ex + ew * t, lid - 0.032 * (1.0 - 0.5 * t**2), lid + 0.004, (38, 26, 26), 3)
        pts.append((ix, ey))

        # Brow: inner end, arch, outer end; it never comes down onto the eye.
        inner, outer = ex - sgn * ew * 1.0, ex + sgn * ew * 1.3
        base = ey - ehb - 0.1 - 0.12 * braise
        xs = np.array([inner, 0.5 * (inner + outer), outer])
        top = np.array([base - 0.075 * btilt, base - 0.03, base + 0.03 + 0.02 * btilt])
        thick = ident["brow"] * np.array([1.15, 1.0, 0.6])
        top = np.minimum(top, ey - eh - 0.04 - thick)
        cv.band(xs, top, top + thick, brow_colour, 2)
        # iBUG brows: 5 points on the band's mid-line, image-left to image-right; eyes: the corners and
        # two points on each lid (upper lid at t = -0.4, 0.4, lower lid back), outer corner first on
        # the image-left eye, inner corner first on the other (the iBUG order).
        mid = top + thick / 2
        u = np.linspace(0.0, 1.0, 5)
        order = slice(None, None, -1) if sgn < 0 else slice(None)
        bx, by = xs[order], mid[order]
        cv.marks[f"brow{sgn:+d}"] = np.column_stack([np.interp(u, [0, 0.5, 1], bx), np.interp(u, [0, 0.5, 1], by)])
        lid_t = np.array([-1.0, -0.4, 0.4, 1.0, 0.4, -0.4])
        lid_y = ey + eh * np.sqrt(np.clip(1.0 - lid_t**2, 0.0, None)) * np.array([0, -1, -1, 0, 1, 1])
        cv.marks[f"eye{sgn:+d}"] = np.column_stack([ex + ew * lid_t, lid_y])
    return np.array(pts)


def _draw_nose(cv: Canvas, ident: dict, dx: float, yaw: float, lip_raise: float) -> np.ndarray:
    skin, nw = ident["skin"], ident["nose_w"]
    top, tip = ident["eye_y"] + 0.05, ident["eye_y"] + ident["nose_len"]
    xt, xb = dx * 1.05, dx + 0.1 * yaw  # the tip sticks out, so it moves further than the bridge
    cv.poly([xt - 0.045, xt + 0.045, xb + nw, xb + nw * 0.55, xb - nw * 0.55, xb - nw],
            [top, top, tip - 0.02, tip + 0.04, tip + 0.04, tip - 0.02], _shade(skin, 0.8), 4)
    for sgn in (-1, 1):
        cv.ellipse(xb + sgn * nw * 0.45, tip + 0.012, 0.036, 0.019, _shade(skin, 0.35), 4, n=12)
    # iBUG 27-30 down the bridge from eye level to the tip, 31-35 along the nostril base.
    bridge = np.linspace(0.0, 1.0, 4)
    cv.marks["nose_bridge"] = np.column_stack([xt + (xb - xt) * bridge, ident["eye_y"] + (tip - ident["eye_y"]) * bridge])
    base_x = np.array([-0.8, -0.45, 0.0, 0.45, 0.8]) * nw
    cv.marks["nose_base"] = np.column_stack([xb + base_x, tip + np.array([0.0, 0.03, 0.04, 0.03, 0.0])])
    if lip_raise > 0.35:  # disgust wrinkles across the bridge
        for k in range(3):
            y = top + (0.22 + 0.13 * k) * (tip - top)
            cv.poly([xt - 0.07, xt + 0.07, xt + 0.07, xt - 0.07], [y, y, y + 0.018, y + 0.018],
                    _shade(skin, 0.55), 4)
    return np.array([xb, tip])


def _draw_mouth(cv: Canvas, ident: dict, dx: float, curve: float, mopen: float, mwidth: float,
                lip_raise: float) -> np.ndarray:
    hw = max(0.1, ident["mouth_w"] * (1.0 + 0.4 * mwidth))
    my = ident["mouth_y"]
    t = np.linspace(-1.0, 1.0, 13)
    xs = dx + hw * t
    env = np.sqrt(1.0 - t**2)
    centre = my - 0.13 * curve * t**2
    gap = max(mopen, 0.0) * 0.16 * env
    curl = max(lip_raise, 0.0) * 0.09 * np.clip(1.0 - ((t - 0.45 * ident["curl_side"]) / 0.5) ** 2, 0, None)
    press = 1.0 + 0.55 * min(mopen, 0.0)
    up_in, lo_in = centre - gap - curl, centre + gap
    lip_env = 0.15 + 0.85 * env**0.7
    up_out = up_in - ident["lip"] * 0.85 * press * lip_env
    lo_out = lo_in + ident["lip"] * 1.15 * press * lip_env
    cv.band(xs, up_out, lo_out, ident["lip_color"], 5)
    if (lo_in - up_in).max() > 0.012:
        cv.band(xs, up_in, lo_in, (66, 22, 28), 5)
        teeth = float(np.clip(0.9 * curve + 1.1 * lip_raise, 0.0, 0.95))
        if teeth > 0.05:
            cv.band(xs, up_in, up_in + teeth * (lo_in - up_in), (236, 232, 222), 5)
    else:
        cv.band(xs, centre - 0.008, centre + 0.008, _shade(ident["lip_color"], 0.45), 5)
    # iBUG 48-59: corners and every other sample of the outer lip outline (upper left to right, lower
    # back); 60-67: the inner outline (corners at the second and second-to-last samples).
    outer = [(xs[0], centre[0])] + [(xs[k], up_out[k]) for k in (2, 4, 6, 8, 10)] + [(xs[12], centre[12])]
    outer += [(xs[k], lo_out[k]) for k in (10, 8, 6, 4, 2)]
    inner = [(xs[1], (up_in[1] + lo_in[1]) / 2)] + [(xs[k], up_in[k]) for k in (3, 6, 9)]
    inner += [(xs[11], (up_in[11] + lo_in[11]) / 2)] + [(xs[k], lo_in[k]) for k in (9, 6, 3)]
    cv.marks["lips"] = np.array(outer + inner)
    return np.array([[xs[0], centre[0]], [xs[-1], centre[-1]]])
