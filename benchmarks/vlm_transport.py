"""What an image+text micro-batch costs to ship to a worker: image references vs pixel tensors.

kdlib sends a micro-batch's images to the teacher and student workers as references (a path, or
encoded bytes for inline and dataset-decoded images), and each worker lays out the pixels with its
own processor. The alternative is laying out pixel tensors in the controller and shipping them
(to the teacher at its resolution and to the student at its own). This script measures, for one
picture and for a micro-batch of 8 pictures, under several image processors:

- bytes of the pickled references (what kdlib sends): a file path; encoded bytes (inline
  base64, or a ``datasets`` Image column, which kdlib reads undecoded); a picture already decoded
  by in-memory rows (Pillow pickles its raw pixels);
- bytes of the float32 pixel tensors each processor makes (what shipping tensors would send),
  and the time the processor takes (what each worker spends, in parallel with the others).

The processors are configured as the families' released checkpoints are (Idefics3 / SmolVLM,
Gemma 3, Qwen3-VL), typed in from their published preprocessing settings, plus kdlib's tiny
test processors; no checkpoint is downloaded. Qwen-VL's processor class needs torchvision, so its
image processor is used alone, which is the part that makes the tensors.

    python benchmarks/vlm_transport.py              # 1024 x 768 pictures
    python benchmarks/vlm_transport.py --size 512 384
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def processors() -> dict:
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from kdlib.demo.vlm import idefics3_processor

    return {
        # SmolVLM: longest edge 4 x 364, tiles of 364 (plus a global view)
        "Idefics3 / SmolVLM (364 px tiles)": Idefics3ImageProcessorPil(
            size={"longest_edge": 4 * 364}, max_image_size={"longest_edge": 364}),
        # Gemma 3: every image resized to 896 x 896
        "Gemma 3 (896 x 896)": Gemma3ImageProcessorPil(size={"height": 896, "width": 896}),
        # Qwen3-VL: 16-pixel patches, 2 x 2 merge, 2 temporal copies, at most 16384 x 32 x 32 pixels
        "Qwen3-VL (patch 16, merge 2)": Qwen2VLImageProcessorPil(
            size={"shortest_edge": 64 * 32 * 32, "longest_edge": 16384 * 32 * 32},
            patch_size=16, temporal_patch_size=2, merge_size=2),
        "kdlib tiny Idefics3 (test, 64 px)": idefics3_processor(longest_edge=64).image_processor,
    }


def picture(width: int, height: int, seed: int):
    """A photo-like picture: smooth gradients plus noise (compresses like a photo, not like a chart)."""
    from kdlib.demo.vlm import make_image

    return make_image(width, height, seed=seed)


def tensor_bytes(out) -> int:
    return sum(v.numel() * v.element_size() for v in out.values() if hasattr(v, "numel"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", nargs=2, type=int, default=[1024, 768], metavar=("W", "H"))
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    from kdlib.data.images import ImageRef

    width, height = args.size
    images = [picture(width, height, seed) for seed in range(args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        jpegs = []
        for i, image in enumerate(images):
            jpegs.append(Path(tmp) / f"picture_{i}.jpg")
            image.save(jpegs[-1], quality=90)
        refs = {
            "a file path (rows naming image files)": [ImageRef(path=p) for p in jpegs],
            "encoded bytes (inline base64, datasets Image column): JPEG q90": [ImageRef(data=p.read_bytes()) for p in jpegs],
            "a decoded picture (in-memory rows only): Pillow's raw pixels": [ImageRef(decoded=im) for im in images],
        }
        print(f"{args.batch} photo-like pictures of {width} x {height}")
        print("\n| what travels | bytes per picture | bytes per micro-batch of", args.batch, "| pickling seconds per picture |")
        print("| --- | ---: | ---: | ---: |")
        for name, batch in refs.items():
            start = time.perf_counter()
            size = len(pickle.dumps(batch))
            seconds = (time.perf_counter() - start) / len(batch)
            print(f"| {name} | {size / len(batch):,.0f} | {size:,} | {seconds:.4f} |")

    print("\n| processor | float32 pixel tensors per picture (bytes) | per micro-batch | processing seconds per picture |")
    print("| --- | ---: | ---: | ---: |")
    for name, processor in processors().items():
        processor(images=[images[:1]], return_tensors="pt")  # warm-up
        start = time.perf_counter()
        out = processor(images=[[image] for image in images], return_tensors="pt")
        seconds = (time.perf_counter() - start) / len(images)
        size = tensor_bytes(out)
        print(f"| {name} | {size / len(images):,.0f} | {size:,} | {seconds:.3f} |")


if __name__ == "__main__":
    main()
