"""An offline CLEVR-like scene generator, so that the CLEVR pipeline (paper §4.1, Table 6a) runs without CLEVR.

It is a stand-in for checking code and for small experiments, not a substitute for CLEVR's numbers.

**Scenes** follow CLEVR's generation rules: 3 to 10 objects placed uniformly in [-3, 3]^2 on a ground plane;
shapes cube / sphere / cylinder; sizes large / small (CLEVR's radii 0.7 / 0.35; a cube's half side is r/sqrt 2);
CLEVR's 8 colours (its ``properties.json`` RGB values); materials rubber (matte: Lambert shading) and metal
(darker diffuse, a tinted sky reflection and a sharp white highlight). A placement is rejected when two
objects are closer than r_i + r_j + 0.25 or closer than 0.4 along left/right or front/behind (CLEVR's
``min_dist`` and ``margin``), when an object leaves the frame, or when less than half of an object stays visible.

**Camera**: a pinhole at (0, -10, 8) looking at (0, 0.5, 0); world x points right, y away from the camera
(behind), z up, so CLEVR's ``directions`` are right (1,0,0), behind (0,1,0), above (0,0,1) and their opposites,
and in the image, left/right are -x/+x and behind/front are up/down. Objects are painted far to near with
soft drop shadows, at 2x resolution, then reduced.

**Output** in CLEVR v1.0's format (``loaders.clevr`` reads it unchanged)::

    DIR/scenes/CLEVR_{split}_scenes.json   {"info": {...}, "scenes": [{"split", "image_index",
        "image_filename", "objects": [{"shape", "size", "color", "material", "3d_coords", "pixel_coords",
        "rotation"}], "relationships": {"left", "right", "front", "behind"}, "directions": {...}}]}
    DIR/images/{split}/CLEVR_{split}_{index:06d}.png

Images are ``size`` x round(2/3 size) pixels (CLEVR's 480 x 320 aspect). Every scene is drawn from its own
generator seeded by (seed, split, index): the output is deterministic and does not depend on the counts.

    python -m loaders.clevr_like --out DIR --train 200 --val 50 --size 128
"""
import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLORS = {"gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
          "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51)}
SIZES = {"large": 0.7, "small": 0.35}
SHAPES = ("cube", "sphere", "cylinder")
MATERIALS = ("rubber", "metal")
DIRECTIONS = {"right": (1.0, 0.0, 0.0), "left": (-1.0, 0.0, 0.0), "behind": (0.0, 1.0, 0.0),
              "front": (0.0, -1.0, 0.0), "above": (0.0, 0.0, 1.0), "below": (0.0, 0.0, -1.0)}
SPLITS = ("train", "val", "test")
MIN_DIST, MARGIN, RELATION_EPS = 0.25, 0.4, 0.2
MIN_VISIBLE = 0.5
SUPERSAMPLE = 2
LIGHT = np.array([-1.0, -1.2, 2.0]) / np.linalg.norm([-1.0, -1.2, 2.0])  # towards the key light


class Camera:
    """Pinhole camera at (0, -10, 8) looking at (0, 0.5, 0) for a width x height image."""

    def __init__(self, width, height):
        self.position = np.array([0.0, -10.0, 8.0])
        forward = np.array([0.0, 0.5, 0.0]) - self.position
        self.forward = forward / np.linalg.norm(forward)
        self.right = np.array([1.0, 0.0, 0.0])
        self.up = np.cross(self.right, self.forward)
        self.width, self.height = width, height
        self.focal = 1.45 * width

    def project(self, points):
        """World points [..., 3] -> (u, v) pixels [..., 2] and depth [...]."""
        rel = np.asarray(points, dtype=np.float64) - self.position
        depth = rel @ self.forward
        u = self.width / 2 + self.focal * (rel @ self.right) / depth
        v = self.height / 2 - self.focal * (rel @ self.up) / depth
        return np.stack([u, v], axis=-1), depth

    def to_world(self, normals_camera):
        """Camera-space normals (x right, y up, z towards the camera) [..., 3] -> world space."""
        basis = np.stack([self.right, self.up, -self.forward])
        return normals_camera @ basis


# ------------------------------------------------------------------------------------------------
# Scene layout
# ------------------------------------------------------------------------------------------------

def sample_objects(rng, camera, min_objects, max_objects):
    """min_objects..max_objects objects (dicts with CLEVR's keys, no pixel_coords yet) satisfying the placement rules."""
    while True:
        count = int(rng.integers(min_objects, max_objects + 1))
        objects = []
        for _ in range(count):
            obj = _place(rng, camera, objects)
            if obj is None:
                break
            objects.append(obj)
        if len(objects) == count:
            return objects


def _place(rng, camera, objects, tries=50):
    for _ in range(tries):
        size = str(rng.choice(list(SIZES)))
        r = SIZES[size]
        x, y = rng.uniform(-3.0, 3.0, size=2)
        if any(_too_close(x, y, r, other) for other in objects):
            continue
        shape, color, material = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), str(rng.choice(MATERIALS))
        z = r / math.sqrt(2.0) if shape == "cube" else r  # the object's centre, as CLEVR records it
        obj = {"shape": shape, "size": size, "color": color, "material": material,
               "3d_coords": [float(x), float(y), z], "rotation": float(rng.uniform(0.0, 360.0))}
        uv, _ = camera.project(_footprint(obj, height=2 * r).reshape(-1, 3))
        if (uv >= 1).all() and (uv <= [camera.width - 2, camera.height - 2]).all():
            return obj
    return None


def _too_close(x, y, r, other):
    ox, oy, _ = other["3d_coords"]
    if math.hypot(x - ox, y - oy) < r + SIZES[other["size"]] + MIN_DIST:
        return True
    return abs(x - ox) < MARGIN or abs(y - oy) < MARGIN


def _footprint(obj, height, points=32):
    """[2, points, 3]: the object's bounding circle at z = 0 and z = height (for frame and shadow tests)."""
    x, y, _ = obj["3d_coords"]
    r = SIZES[obj["size"]]
    angle = np.linspace(0, 2 * np.pi, points, endpoint=False)
    ring = np.stack([x + r * np.cos(angle), y + r * np.sin(angle), np.zeros(points)], axis=1)
    return np.stack([ring, ring + [0.0, 0.0, height]])


def relationships(objects):
    """CLEVR's rule: j is in ``out[rel][i]`` when (coords_j - coords_i) . direction_rel > 0.2."""
    coords = np.array([obj["3d_coords"] for obj in objects], dtype=np.float64)
    out = {}
    for name in ("right", "behind", "front", "left"):
        dot = (coords[None, :, :] - coords[:, None, :]) @ np.array(DIRECTIONS[name])
        out[name] = [[int(j) for j in np.flatnonzero(row > RELATION_EPS)] for row in dot]
    return out


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------

def shade(base, normals, view, material):
    """RGB in [0, 1] of surface points with world ``normals`` [..., 3], seen from ``view`` (unit vector)."""
    base = np.asarray(base, dtype=np.float64) / 255.0
    lambert = np.clip(normals @ LIGHT, 0.0, 1.0)[..., None]
    half = (LIGHT + view) / np.linalg.norm(LIGHT + view)
    facing = np.clip(normals @ half, 0.0, 1.0)[..., None]
    if material == "rubber":
        return np.clip(base * (0.32 + 0.68 * lambert) + 0.04 * facing ** 6, 0.0, 1.0)
    sky = np.clip(normals[..., 2:3], 0.0, 1.0)
    rim = 0.55 + 0.45 * np.clip(normals @ view, 0.0, 1.0)[..., None]
    return np.clip(rim * (base * (0.10 + 0.40 * lambert + 0.35 * sky)) + 1.1 * facing ** 60, 0.0, 1.0)


def _convex_hull(points):
    """Andrew's monotone chain on [n, 2] points; returns the hull vertices in order."""
    pts = sorted(map(tuple, np.asarray(points, dtype=np.float64)))

    def half(seq):
        chain = []
        for p in seq:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    return np.array(half(pts) + half(reversed(pts)))


class Canvas:
    """A supersampled RGB float image with an owner map (which object painted each pixel). Objects are drawn
    in a window around their projected outline (``window``), which keeps a scene to a few milliseconds."""

    def __init__(self, camera):
        self.camera = camera
        h, w = camera.height, camera.width
        rows = np.linspace(0.0, 1.0, h)[:, None, None]
        self.rgb = np.broadcast_to(0.36 + 0.20 * rows, (h, w, 3)) * np.array([1.0, 0.99, 0.97])
        self.owner = np.full((h, w), -1, dtype=np.int64)

    def window(self, outline):
        """``(slices, pixel centres [h, w, 2], origin)`` of the box around ``outline`` [n, 2] (pixels)."""
        (u0, v0), (u1, v1) = np.floor(outline.min(0)).astype(int) - 1, np.ceil(outline.max(0)).astype(int) + 1
        u0, v0 = max(u0, 0), max(v0, 0)
        u1, v1 = min(u1, self.camera.width), min(v1, self.camera.height)
        v, u = np.mgrid[v0:v1, u0:u1]
        return (slice(v0, v1), slice(u0, u1)), np.stack([u + 0.5, v + 0.5], axis=-1), np.array([u0, v0])

    def polygon(self, box, origin, polygon):
        """Boolean mask of ``polygon`` (pixels) inside the window ``box``."""
        height, width = box[0].stop - box[0].start, box[1].stop - box[1].start
        mask = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask).polygon([tuple(p) for p in np.asarray(polygon) - origin], fill=255)
        return np.asarray(mask) > 127

    def paint(self, box, mask, colors, index):
        self.rgb[box][mask] = colors[mask]
        self.owner[box][mask] = index

    def shadows(self, objects):
        mask = Image.new("L", (self.camera.width, self.camera.height), 0)
        draw = ImageDraw.Draw(mask)
        for obj in objects:
            ring = _footprint(obj, 0.0)[0]
            shift = 0.35 * SIZES[obj["size"]] * np.array([1.0, 1.2, 0.0])
            uv, _ = self.camera.project(ring + shift)
            draw.polygon([tuple(p) for p in uv], fill=150)
        blurred = np.asarray(mask.filter(ImageFilter.GaussianBlur(radius=self.camera.width / 90))) / 255.0
        self.rgb = self.rgb * (1.0 - 0.45 * blurred[..., None])


def draw_sphere(canvas, obj, index):
    cam = canvas.camera
    (u0, v0), depth = cam.project(np.array(obj["3d_coords"]))
    radius = cam.focal * SIZES[obj["size"]] / depth
    box, pixels, _ = canvas.window(np.array([[u0 - radius, v0 - radius], [u0 + radius, v0 + radius]]))
    d = (pixels - [u0, v0]) / radius
    inside = (d ** 2).sum(-1) < 1.0
    nz = np.sqrt(np.clip(1.0 - (d ** 2).sum(-1), 0.0, 1.0))
    normals = cam.to_world(np.stack([d[..., 0], -d[..., 1], nz], axis=-1))
    canvas.paint(box, inside, shade(COLORS[obj["color"]], normals, -cam.forward, obj["material"]), index)


def draw_cube(canvas, obj, index):
    cam = canvas.camera
    x, y, s = obj["3d_coords"]
    theta = math.radians(obj["rotation"])
    rot = np.array([[math.cos(theta), -math.sin(theta), 0.0], [math.sin(theta), math.cos(theta), 0.0], [0, 0, 1.0]])
    center = np.array([x, y, s])
    faces = []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            normal = rot @ np.eye(3)[axis] * sign
            if normal @ (cam.position - (center + s * normal)) <= 0:
                continue
            a, b = rot @ np.eye(3)[(axis + 1) % 3], rot @ np.eye(3)[(axis + 2) % 3]
            corners = [center + s * (normal + i * a + j * b) for i, j in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
            faces.append((normal, cam.project(np.array(corners))[0]))
    for normal, uv in faces:
        box, pixels, origin = canvas.window(uv)
        mask = canvas.polygon(box, origin, uv)
        colors = shade(COLORS[obj["color"]], np.broadcast_to(normal, mask.shape + (3,)), -cam.forward, obj["material"])
        if obj["material"] == "metal":  # a diagonal sheen across each face
            t = ((pixels - uv.mean(0)) @ np.array([1.0, 1.0])) / (np.ptp(uv, axis=0).sum() / 2 + 1e-6)
            colors = np.clip(colors + 0.55 * np.exp(-((t + 0.25) / 0.22) ** 2)[..., None], 0.0, 1.0)
        canvas.paint(box, mask, colors, index)


def draw_cylinder(canvas, obj, index):
    cam = canvas.camera
    x, y, _ = obj["3d_coords"]
    r = SIZES[obj["size"]]
    uv, _ = cam.project(_footprint(obj, 2 * r, points=64))
    box, pixels, origin = canvas.window(uv.reshape(-1, 2))
    body = canvas.polygon(box, origin, _convex_hull(uv.reshape(-1, 2)))
    (u0, _), depth = cam.project(np.array([x, y, r]))
    nx = np.clip((pixels[..., 0] - u0) / (cam.focal * r / depth), -1.0, 1.0)
    side = cam.to_world(np.stack([nx, np.zeros_like(nx), np.sqrt(1.0 - nx ** 2)], axis=-1))
    side[..., 2] = 0.0
    side /= np.linalg.norm(side, axis=-1, keepdims=True) + 1e-9
    colors = shade(COLORS[obj["color"]], side, -cam.forward, obj["material"])
    if obj["material"] == "metal":  # a vertical highlight on the side facing the light
        colors = np.clip(colors + 0.7 * np.exp(-((nx + 0.35) / 0.14) ** 2)[..., None], 0.0, 1.0)
    canvas.paint(box, body, colors, index)
    top = canvas.polygon(box, origin, uv[1])
    up = np.broadcast_to(np.array([0.0, 0.0, 1.0]), top.shape + (3,))
    canvas.paint(box, top, shade(COLORS[obj["color"]], up, -cam.forward, obj["material"]), index)


DRAW = {"sphere": draw_sphere, "cube": draw_cube, "cylinder": draw_cylinder}


def render(objects, width, height):
    """Returns ``(image uint8 [height, width, 3], visible fraction of each object)``."""
    camera = Camera(width * SUPERSAMPLE, height * SUPERSAMPLE)
    canvas = Canvas(camera)
    canvas.shadows(objects)
    order = sorted(range(len(objects)), key=lambda i: -camera.project(np.array(objects[i]["3d_coords"]))[1])
    drawn = np.zeros(len(objects))
    for i in order:
        DRAW[objects[i]["shape"]](canvas, objects[i], i)
        drawn[i] = (canvas.owner == i).sum()
    visible = np.bincount(canvas.owner[canvas.owner >= 0], minlength=len(objects)) / np.maximum(drawn, 1)
    big = Image.fromarray(np.round(canvas.rgb * 255).astype(np.uint8))
    return np.asarray(big.reduce(SUPERSAMPLE)), visible


# ------------------------------------------------------------------------------------------------
# Scenes and files
# ------------------------------------------------------------------------------------------------

def make_scene(seed, split, index, width, height, min_objects=3, max_objects=10):
    """Returns ``(scene dict in CLEVR's schema, image uint8 [height, width, 3])``."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    camera = Camera(width, height)
    while True:
        objects = sample_objects(rng, camera, min_objects, max_objects)
        image, visible = render(objects, width, height)
        if visible.min() >= MIN_VISIBLE:
            break
    for obj in objects:
        (u, v), depth = camera.project(np.array(obj["3d_coords"]))
        obj["pixel_coords"] = [int(round(u)), int(round(v)), round(float(depth), 4)]
    name = f"CLEVR_{split}_{index:06d}.png"
    scene = {"split": split, "image_index": index, "image_filename": name, "objects": objects,
             "relationships": relationships(objects), "directions": {k: list(v) for k, v in DIRECTIONS.items()}}
    return scene, image


def generate(out, counts, size=128, seed=0, min_objects=3, max_objects=10):
    """Writes ``counts`` ({split: number}) scenes under ``out``; returns {split: scenes JSON path}."""
    out = Path(out)
    width, height = size, int(round(size * 2 / 3))
    written = {}
    for split, count in counts.items():
        image_dir = out / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        scenes = []
        for index in range(count):
            scene, image = make_scene(seed, split, index, width, height, min_objects, max_objects)
            Image.fromarray(image).save(image_dir / scene["image_filename"])
            scenes.append(scene)
        path = out / "scenes" / f"CLEVR_{split}_scenes.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {"split": split, "version": "1.0", "date": "n/a",
                "license": f"generated by loaders.clevr_like (seed {seed}, {width}x{height})"}
        path.write_text(json.dumps({"info": info, "scenes": scenes}))
        written[split] = path
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate CLEVR-like scenes in CLEVR v1.0's format.")
    parser.add_argument("--out", required=True, help="output directory (becomes a CLEVR_v1.0-like root)")
    parser.add_argument("--train", type=int, default=200, help="number of train scenes")
    parser.add_argument("--val", type=int, default=50, help="number of val scenes")
    parser.add_argument("--size", type=int, default=128, help="image width; height is 2/3 of it (CLEVR: 480)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-objects", type=int, default=3)
    parser.add_argument("--max-objects", type=int, default=10)
    args = parser.parse_args(argv)
    if not 1 <= args.min_objects <= args.max_objects:
        parser.error("need 1 <= --min-objects <= --max-objects")
    paths = generate(args.out, {"train": args.train, "val": args.val}, args.size, args.seed,
                     args.min_objects, args.max_objects)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
