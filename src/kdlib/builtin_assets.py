"""Built-in demo assets, made on first use: the ``builtin://<asset>/<path>`` locations.

Some demos need files that are cheaper to generate than to ship: the VLM quickstart's tiny random
vision-language models and its pictures. ``builtin://vlm_quickstart/teacher`` names a file or
directory of such an asset. The first use builds the whole asset into kdlib's cache
(``<cache>/builtin/<asset>-v<version>``) under a file lock (Ray workers and sweep jobs may ask at
once), from fixed seeds (every machine builds the same models, pictures and rows); later uses find
it there. Bumping an asset's version rebuilds it next to the old one.

``vlm_quickstart`` holds a tiny random Idefics3 (SmolVLM's architecture) ``teacher`` that reads
images at a longest edge of 96 pixels, a ``student_processor`` for the same tokenizer at 64 pixels
(fewer image tokens: a cheaper student), generated pictures of coloured shapes, and
``train.jsonl`` / ``eval.jsonl`` chats about them (one or two pictures, or text only) in the
OpenAI parts layout.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

_COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (220, 190, 30)}
_SHAPES = ("circle", "square", "triangle")
_TEXT_CHATS = [
    ("What do you get when you mix blue and yellow paint?", "Green paint."),
    ("How many corners does a triangle have?", "Three corners."),
    ("How many sides does a square have?", "Four sides."),
    ("Is a circle round?", "Yes, a circle is round."),
]


def build_vlm_quickstart(directory: Path) -> None:
    from kdlib.demo.text import write_jsonl
    from kdlib.demo.vlm import build_idefics3, idefics3_processor

    build_idefics3(directory / "teacher", longest_edge=96, num_layers=4, hidden_size=64, seed=0)
    idefics3_processor(longest_edge=64).save_pretrained(str(directory / "student_processor"))
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    pictures = []
    for i in range(48):
        colour, shape = rng.choice(sorted(_COLOURS)), rng.choice(_SHAPES)
        name = f"shape{i:02d}.png"
        _draw(colour, shape, rng).save(images / name)
        pictures.append((f"images/{name}", colour, shape))
    write_jsonl(directory / "train.jsonl", _chats(96, pictures[:40], rng))
    write_jsonl(directory / "eval.jsonl", _chats(16, pictures[40:], rng))


# name -> (version, builder writing the asset into a directory)
ASSETS: dict[str, tuple[int, Callable[[Path], None]]] = {"vlm_quickstart": (1, build_vlm_quickstart)}


def builtin_location(spec: str, root: Path) -> Path:
    """The path of ``<asset>/<relative path>`` inside the built asset under ``root``, building
    the asset first if this machine has not yet."""
    from filelock import FileLock

    name, _, relative = spec.partition("/")
    if name not in ASSETS:
        raise FileNotFoundError(f"builtin://{spec}: unknown built-in asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    version, build = ASSETS[name]
    directory = root / f"{name}-v{version}"
    done = directory / ".complete"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(directory) + ".lock"):
            if not done.exists():
                build(directory)
                done.touch()
    path = directory / relative
    if not path.exists():
        raise FileNotFoundError(f"builtin://{spec}: no {relative!r} in the built-in asset {name!r}")
    return path


def _draw(colour: str, shape: str, rng: random.Random):
    """A picture of one coloured shape on a light, noisy background (sizes and places vary)."""
    from PIL import Image, ImageDraw

    width, height = rng.randrange(48, 97, 8), rng.randrange(40, 81, 8)
    background = tuple(rng.randrange(200, 256) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    for _ in range(width * height // 20):  # speckles, so no two pictures are alike
        x, y = rng.randrange(width), rng.randrange(height)
        draw.point((x, y), fill=tuple(max(0, c - rng.randrange(40)) for c in background))
    size = rng.randrange(min(width, height) // 2, min(width, height) - 4)
    x0, y0 = rng.randrange(0, width - size), rng.randrange(0, height - size)
    box = (x0, y0, x0 + size, y0 + size)
    fill = _COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + size // 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    return image


def _chats(n: int, pictures: list[tuple[str, str, str]], rng: random.Random) -> list[dict]:
    """``n`` chats: mostly one picture, every fifth two pictures, every seventh text only."""
    rows = []
    for i in range(n):
        if i % 7 == 6:
            question, answer = rng.choice(_TEXT_CHATS)
            content = [{"type": "text", "text": question}]
        elif i % 5 == 4:
            (a, colour_a, shape_a), (b, colour_b, shape_b) = rng.sample(pictures, 2)
            content = [{"type": "image", "image": a}, {"type": "image", "image": b},
                       {"type": "text", "text": "Do the two pictures show the same shape?"}]
            answer = (f"Yes, both show a {shape_a}." if shape_a == shape_b
                      else f"No: a {colour_a} {shape_a} and a {colour_b} {shape_b}.")
        else:
            path, colour, shape = rng.choice(pictures)
            question, answer = rng.choice([
                ("What shape is in the picture?", f"A {shape}."),
                ("What colour is the shape?", f"It is {colour}."),
                ("Describe the picture.", f"A {colour} {shape} on a light background."),
            ])
            content = [{"type": "image", "image": path}, {"type": "text", "text": question}]
        rows.append({"id": i, "messages": [
            {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]})
    return rows
