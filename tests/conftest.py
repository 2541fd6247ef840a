"""Shared fixtures: tiny random models and tokenizers saved to temp dirs, small chat datasets.

Models are built from real transformers configs (Llama, Qwen3) and loaded by path exactly as a real
run loads a checkpoint. Everything is session-scoped: built once, a few seconds in all.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def chatml_tokenizer_dir(tiny_dir) -> Path:
    from kdlib.demo.text import build_tokenizer

    path = tiny_dir / "tok_chatml"
    build_tokenizer(path, template="chatml")
    return path


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tiny_dir) -> Path:
    from kdlib.demo.text import build_tokenizer

    path = tiny_dir / "tok_llama3"
    build_tokenizer(path, template="llama3")
    return path


@pytest.fixture(scope="session")
def unigram_tokenizer_dir(tiny_dir) -> Path:
    """A metaspace Unigram (BOS, split digits, byte fallback, phantom prefix space): the different
    tokenizer of cross-tokenizer tests."""
    from kdlib.demo.text import build_unigram_tokenizer

    path = tiny_dir / "tok_unigram"
    build_unigram_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tiny_dir, chatml_tokenizer_dir) -> Path:
    """4-layer Llama (untied head) with the ChatML tokenizer."""
    from kdlib.demo.text import build_model

    path = tiny_dir / "llama"
    build_model(path, arch="llama", tokenizer_dir=chatml_tokenizer_dir, num_layers=4)
    return path


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_dir, chatml_tokenizer_dir) -> Path:
    """4-layer Qwen3 (tied embeddings) with the ChatML tokenizer."""
    from kdlib.demo.text import build_model

    path = tiny_dir / "qwen3"
    build_model(path, arch="qwen3", tokenizer_dir=chatml_tokenizer_dir, num_layers=4, tie_word_embeddings=True, seed=1)
    return path


@pytest.fixture(scope="session")
def chat_data(tiny_dir) -> dict[str, Path]:
    """Train (24 rows) and eval (8 rows) chats in messages format."""
    from kdlib.demo.text import chat_rows, write_jsonl

    return {
        "train": write_jsonl(tiny_dir / "data" / "train.jsonl", chat_rows(24, seed=0)),
        "eval": write_jsonl(tiny_dir / "data" / "eval.jsonl", chat_rows(8, seed=1)),
    }


@pytest.fixture
def tiny_overrides(tiny_llama, chat_data, tmp_path) -> list[str]:
    """Overrides for a fast run: tiny Llama teacher, 2-layer student pruned from it."""
    return [
        f"teacher.model={tiny_llama}",
        f"student.model={tiny_llama}",
        "student.num_layers=2",
        "student.autocast=false",  # exactness tests run in float32 (the embedded default uses bf16)
        "teacher.dtype=float32",
        "train.packing=false",  # padded micro-batches: the tests that pack say so
        f"data.train={chat_data['train']}",
        f"data.eval={chat_data['eval']}",
        "train.max_steps=3",
        "train.lr=1e-3",
        "logging.progress=false",
        "device=cpu",
        f"output_dir={tmp_path / 'run'}",
    ]


# Teacher-side image settings per tiny VLM family: a higher resolution, so the teacher turns the
# same image into more placeholder tokens than the student does.
VLM_HIRES = {
    "idefics3": {"longest_edge": 96},
    "gemma3": {"image_size": 64, "tokens_per_image": 16},
    "qwen3_vl": {"max_pixels": 96 * 96},
}


@pytest.fixture(scope="session")
def tiny_vlm(tiny_dir):
    """``tiny_vlm(family)``: a tiny random VLM with its processor (idefics3, gemma3, qwen3_vl);
    ``tiny_vlm(family, hires=True)``: another of the same family with higher-resolution image
    preprocessing (the teacher in tests). Each is built once per session, in a fraction of a second."""
    from kdlib.demo.vlm import build_vlm

    built: dict[tuple[str, bool], Path] = {}

    def get(family: str, hires: bool = False) -> Path:
        if (family, hires) not in built:
            options = dict(VLM_HIRES[family], seed=3) if hires else {}
            built[family, hires] = build_vlm(tiny_dir / f"vlm_{family}{'_hires' if hires else ''}", family, **options)
        return built[family, hires]

    return get


@pytest.fixture(scope="session")
def vlm_images(tiny_dir) -> dict[str, Path]:
    """Generated PNG images of different sizes and aspect ratios: img0 .. img3."""
    from kdlib.demo.vlm import make_image

    directory = tiny_dir / "vlm_images"
    directory.mkdir(exist_ok=True)
    out = {}
    for i, (width, height) in enumerate([(64, 48), (40, 40), (24, 64), (80, 30)]):
        out[f"img{i}"] = directory / f"img{i}.png"
        make_image(width, height, seed=i).save(out[f"img{i}"])
    return out


@pytest.fixture(scope="session")
def vlm_chat_data(tiny_dir, vlm_images) -> Path:
    """8 image+text chats (one image, two images, text only, two turns) next to vlm_images."""
    from kdlib.demo.text import write_jsonl
    from kdlib.demo.vlm import vision_chat_rows

    names = sorted(path.name for path in vlm_images.values())
    return write_jsonl(tiny_dir / "vlm_images" / "chats.jsonl", vision_chat_rows(8, names, seed=0))


@pytest.fixture(scope="session")
def vlm_eval_data(vlm_chat_data) -> Path:
    """8 other image+text chats (no row equal to one of vlm_chat_data's) next to the same images."""
    from kdlib.demo.text import write_jsonl
    from kdlib.demo.vlm import vision_chat_rows

    names = sorted(path.name for path in vlm_chat_data.parent.glob("img*.png"))
    return write_jsonl(vlm_chat_data.parent / "eval_chats.jsonl", vision_chat_rows(8, names, seed=1))


@pytest.fixture
def vlm_overrides(tiny_vlm, vlm_chat_data, vlm_eval_data, tmp_path):
    """``vlm_overrides(family)``: overrides for a fast image+text run. The teacher is the family's
    higher-resolution tiny VLM; the 2-layer student reads images at the lower resolution: for
    Idefics3 it is the teacher pruned, with the low-resolution processor (its tiles keep their size,
    only their number changes); Gemma 3's vision tower is tied to one image size, so its student is
    the low-resolution model pruned."""

    def get(family: str) -> list[str]:
        teacher = tiny_vlm(family, hires=True)
        if family == "idefics3":
            student = [f"student.model={teacher}", f"student.tokenizer={tiny_vlm(family)}"]
        else:
            student = [f"student.model={tiny_vlm(family)}"]
        return [
            f"teacher.model={teacher}", *student, "student.num_layers=2", "student.autocast=false",
            "teacher.dtype=float32", f"data.train={vlm_chat_data}", f"data.eval={vlm_eval_data}",
            "train.max_steps=3", "train.global_batch_size=4", "train.micro_batch_size=2", "train.lr=1e-3",
            "logging.progress=false", "device=cpu", f"output_dir={tmp_path / 'run'}",
        ]

    return get
