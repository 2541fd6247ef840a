"""Image+text rows: every supported layout gives the same typed conversation; bad images give a
one-line error naming the data file, the row and the image, or a drop counted by cause."""

from __future__ import annotations

import base64
import shutil

import numpy as np
import pytest

from kdlib.config import DataConfig
from kdlib.data.formats import detect_format
from kdlib.data.images import BadImages, ImageRef, image_ref, open_image
from kdlib.data.multimodal import (
    ImagePart,
    TextPart,
    Turn,
    VisionConversation,
    data_root,
    row_holds_images,
    row_to_vision_conversation,
)
from kdlib.data.sources import load_rows
from kdlib.data.vision_encoding import VisionChatEncoder
from kdlib.data.vision_samples import build_vision_samples
from kdlib.errors import DataError
from kdlib.demo.text import write_jsonl

QUESTION, ANSWER = "What is in the picture?", "A gradient."


@pytest.fixture
def data_dir(tmp_path, vlm_images):
    for name, path in vlm_images.items():
        shutil.copy(path, tmp_path / f"{name}.png")
    return tmp_path


def _parse(path, **options) -> list[VisionConversation]:
    source = load_rows(str(path), split="train", key="data.train")
    cfg = DataConfig(train=str(path), **options)
    fmt = detect_format(list(source.rows.column_names), cfg, str(path))
    return [
        row_to_vision_conversation(row, fmt, cfg, data_root(source.name), source.where(i))
        for i, row in enumerate(source.rows)
    ]


def _user(*parts):
    return {"role": "user", "content": list(parts)}


def _answer_message():
    return {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}


def test_all_layouts_parse_to_the_same_conversation(data_dir):
    absolute = str((data_dir / "img0.png").resolve())
    text = {"type": "text", "text": QUESTION}
    layouts = {
        "parts with relative paths": {"messages": [_user({"type": "image", "image": "img0.png"}, text), _answer_message()]},
        "image_url parts, file URL": {
            "messages": [_user({"type": "image_url", "image_url": {"url": "file://" + absolute}}, text), _answer_message()]
        },
        "value-less parts + images column": {
            "messages": [_user({"type": "image"}, text), _answer_message()], "images": ["img0.png"],
        },
        "string content with placeholders": {
            "messages": [{"role": "user", "content": f"<image>\n{QUESTION}"}, {"role": "assistant", "content": ANSWER}],
            "images": [absolute],
        },
        "sharegpt + images": {
            "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": ANSWER}],
            "images": ["img0.png"],
        },
        "llava single image column": {
            "conversations": [{"from": "human", "value": f"<image>{QUESTION}"}, {"from": "gpt", "value": ANSWER}],
            "image": "img0.png",
        },
        "prompt/response + images": {"prompt": f"<image>\n{QUESTION}", "response": ANSWER, "images": ["img0.png"]},
        "alpaca + images": {"instruction": f"<image> {QUESTION}", "output": ANSWER, "images": ["img0.png"]},
    }
    expected = VisionConversation(
        turns=[Turn("user", [ImagePart(0), TextPart(QUESTION)]), Turn("assistant", [TextPart(ANSWER)])],
        images=[ImageRef(path=(data_dir / "img0.png").resolve())],
    )
    for i, (name, row) in enumerate(layouts.items()):
        (conversation,) = _parse(write_jsonl(data_dir / f"layout{i}.jsonl", [row]))
        assert conversation == expected, name
        assert row_holds_images(row, DataConfig(train="x")), name
    assert not row_holds_images({"messages": [{"role": "user", "content": QUESTION}]}, DataConfig(train="x"))


def test_several_images_keep_their_order_and_the_text_between_them(data_dir):
    parts_row = {"messages": [
        {"role": "system", "content": "Be brief."},
        _user({"type": "text", "text": "Compare"}, {"type": "image", "path": "img1.png"},
              {"type": "text", "text": "with"}, {"type": "image", "path": "img2.png"}, {"type": "text", "text": "."}),
        _answer_message(),
    ]}
    sharegpt_row = {
        "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Compare <image> with <image>."},
                          {"from": "gpt", "value": ANSWER}],
        "images": ["img1.png", "img2.png"],
    }
    (a,) = _parse(write_jsonl(data_dir / "parts.jsonl", [parts_row]))
    (b,) = _parse(write_jsonl(data_dir / "sharegpt.jsonl", [sharegpt_row]))
    assert a == b
    assert a.turns[1].parts == [TextPart("Compare"), ImagePart(0), TextPart("with"), ImagePart(1), TextPart(".")]
    assert [ref.path.name for ref in a.images] == ["img1.png", "img2.png"]
    assert a.without_response().turns == a.turns[:2] and a.without_response().images == a.images
    assert a.template_messages()[1]["content"][1] == {"type": "image"}


def test_inline_images_decode_to_the_same_pixels(data_dir):
    raw = (data_dir / "img0.png").read_bytes()
    encoded = base64.b64encode(raw).decode()
    rows = [
        {"messages": [_user({"type": "image", "image": f"data:image/png;base64,{encoded}"}), _answer_message()]},
        {"messages": [_user({"type": "image"}), _answer_message()], "images": [encoded]},  # bare base64
    ]
    conversations = _parse(write_jsonl(data_dir / "inline.jsonl", rows))
    reference = np.asarray(open_image(ImageRef(path=data_dir / "img0.png"), "x"))
    for conversation in conversations:
        assert conversation.images == [ImageRef(data=raw)]
        assert np.array_equal(np.asarray(open_image(conversation.images[0], "x")), reference)
    # the dict form of a datasets Image column, and an image the dataset already decoded
    assert image_ref({"bytes": raw, "path": None}, data_dir, "x") == ImageRef(data=raw)
    decoded = open_image(ImageRef(path=data_dir / "img0.png"), "x")
    assert image_ref(decoded, data_dir, "x").decoded is decoded


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [_user({"type": "image"}), _answer_message()]}, r"row 1: message 0 part 0 has an image slot without an image \(no images column\)"),
        ({"messages": [{"role": "user", "content": "<image> <image>"}, _answer_message()], "images": ["img0.png"]},
         r"row 1: message 0 has an image slot without an image \(only 1 images in the images column\)"),
        ({"messages": [{"role": "user", "content": "<image>"}, _answer_message()], "images": ["img0.png", "img1.png"]},
         r"row 1: the text has 1 image slots but the images column holds 2 images"),
        ({"messages": [_user({"type": "video", "video": "a.mp4"}), _answer_message()]}, r"row 1: message 0 part 0 has type 'video'"),
        ({"prompt": ["a"], "response": "b"}, r"row 1: message 0 must have 'role' and 'content'"),
    ],
)
def test_layout_errors_name_the_row(data_dir, row, message):
    with pytest.raises(DataError, match=message):
        _parse(write_jsonl(data_dir / "bad.jsonl", [row]))


@pytest.fixture(scope="module")
def encoder(tiny_vlm):
    from transformers import AutoProcessor

    return VisionChatEncoder(AutoProcessor.from_pretrained(tiny_vlm("idefics3")))


def _bad_rows(data_dir) -> dict[str, dict]:
    """A good row, then one row per kind of bad image."""
    (data_dir / "not_an_image.png").write_text("hello")
    (data_dir / "truncated.png").write_bytes((data_dir / "img1.png").read_bytes()[:300])

    def with_image(value):
        return {"messages": [_user({"type": "image", "image": value}, {"type": "text", "text": QUESTION}), _answer_message()]}

    return {
        "good": with_image("img1.png"),  # 40x40 = 1600 pixels
        "missing": with_image("missing.png"),
        "not an image": with_image("not_an_image.png"),
        "truncated": with_image("truncated.png"),
        "too large": with_image("img0.png"),  # 64x48 = 3072 pixels
        "remote": with_image("https://example.com/cat.png"),
    }


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", r"bad.jsonl, row 2: image file not found: .*missing.png$"),
        ("not an image", r"bad.jsonl, row 2: cannot read image .*not_an_image.png: not an image format Pillow reads"),
        ("truncated", r"bad.jsonl, row 2: cannot read image .*truncated.png: "),
        ("too large", r"bad.jsonl, row 2: image .*img0.png has 64x48 = 3072 pixels, more than data.max_image_pixels=2000$"),
        ("remote", r"bad.jsonl, row 2: message 0 part 0: remote image https://example.com/cat.png is not downloaded"),
    ],
)
def test_bad_images_are_one_line_errors_naming_file_row_and_image(data_dir, encoder, kind, message):
    rows = _bad_rows(data_dir)
    path = write_jsonl(data_dir / "bad.jsonl", [rows["good"], rows[kind]])
    with pytest.raises(DataError) as caught:
        build_vision_samples(DataConfig(train=str(path), max_image_pixels=2000), "train", encoder)
    assert "\n" not in str(caught.value)
    assert caught.match(message)


def test_bad_images_dropped_and_counted_by_cause(data_dir, encoder):
    rows = _bad_rows(data_dir)
    path = write_jsonl(data_dir / "bad.jsonl", [*rows.values(), rows["good"]])
    cfg = DataConfig(train=str(path), max_image_pixels=2000, bad_images=BadImages.drop)
    samples, report = build_vision_samples(cfg, "train", encoder)
    assert [s.index for s in samples] == [0, 6] and report.kept == 2 and report.rows == 7
    assert report.dropped == {"image not found": 1, "unreadable image": 2, "image too large": 1, "remote image": 1}
    assert "1 dropped (image too large)" in report.summary()


def test_an_image_in_the_trained_turn_is_an_error(data_dir, encoder):
    row = {"messages": [_user({"type": "text", "text": QUESTION}),
                        {"role": "assistant", "content": [{"type": "image", "image": "img0.png"}]}]}
    with pytest.raises(DataError, match=r"row 1: the trained \(last assistant\) turn holds an image"):
        build_vision_samples(DataConfig(train=str(write_jsonl(data_dir / "d.jsonl", [row]))), "train", encoder)
