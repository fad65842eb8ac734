"""Text-to-image: tokenizer, captioned MNIST, the text conditioner, a debug=fast text run end to end
(tokenizer restored from the checkpoint alone, prompts in sample.py, one-line prompt errors), and
the frozen pretrained encoder option (skipped without `transformers`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from ldm.data.captions import LEVEL_WORDS, MNIST5kCaptions, measure_attributes, phrase, place
from ldm.models.loading import load_latent_diffusion
from ldm.modules.text import CaptionTokenizer, TextConditioner, train_vocab
from ldm.sample import run as sample_run
from ldm.train import run as train_run
from ldm.utils.errors import UserError
from tests.conftest import compose_config

TEXT_FAST = [
    "debug=fast",
    "data=mnist5k_captions",
    "conditioning=text",
    "fid.every_n_epochs=0",
    "model.diffusion.conditioner.dim=16",
    "model.diffusion.conditioner.depth=1",
    "model.diffusion.conditioner.num_heads=2",
]


# ------------------------------------------------------------------------------ tokenizer
def test_tokenizer_round_trips_and_masks_padding():
    vocab = train_vocab(["a thick 7", "the digit seven, slanted right", "a 3 left of a 7"])
    assert vocab[:3] == ["[PAD]", "[BOS]", "[UNK]"]
    tok = CaptionTokenizer(vocab, max_length=8)
    ids, mask = tok.encode(["A Thick 7", "the digit seven, slanted right", ""])
    assert ids.shape == mask.shape == (3, 8)
    assert tok.decode(ids[0]) == "a thick 7"  # lower-cased
    assert tok.decode(ids[1]) == "the digit seven , slanted right"
    assert mask.sum(1).tolist() == [4, 7, 1]  # [BOS] + words; the empty caption keeps [BOS]
    assert (ids[~mask] == 0).all()  # [PAD] everywhere the mask is False
    assert tok.unknown_words("a purple 7") == ["purple"]
    assert tok.decode(tok.encode(["a purple 7"])[0][0]) == "a 7"  # [UNK] dropped in decode
    # a rebuilt tokenizer from the stored vocabulary encodes identically
    assert torch.equal(CaptionTokenizer(list(vocab), 8).encode(["a thick 7"])[0], ids[:1])


def test_text_conditioner_drops_to_the_empty_caption_and_masks():
    torch.manual_seed(0)
    cond = TextConditioner(
        train_vocab(["a thick 7", "a thin 3"]), max_length=6, dim=8, depth=1, num_heads=2
    )
    out = cond({"caption": ["a thick 7", "a thin 3"]}, drop=torch.tensor([False, True]))
    assert out["context"].shape == (2, 6, 8) and out["context_mask"].shape == (2, 6)
    empty = cond.unconditional(1, "cpu")
    torch.testing.assert_close(out["context"][1], empty["context"][0])
    assert out["context_mask"][1].tolist() == [True] + [False] * 5
    assert not torch.allclose(out["context"][0], empty["context"][0])


def test_pooled_caption_vector_is_the_bos_output_and_knows_word_order():
    torch.manual_seed(0)
    vocab = train_vocab(["a 3 left of a 7", "a thin 3"])
    cond = TextConditioner(vocab, max_length=8, dim=8, depth=1, num_heads=2, pooled=True)
    assert cond.pooled_dim == 8
    captions = ["a 3 left of a 7", "a 7 left of a 3", "a thin 3"]
    out = cond({"caption": captions}, drop=torch.tensor([False, False, True]))
    torch.testing.assert_close(out["pooled"], out["context"][:, 0])  # (B, D): [BOS]
    empty = cond.unconditional(1, "cpu")["pooled"][0]
    torch.testing.assert_close(out["pooled"][2], empty)  # dropped row: the null condition
    # same words, other order: the position embeddings make the pooled vectors differ
    assert (out["pooled"][0] - out["pooled"][1]).abs().max() > 1e-4
    assert "pooled" not in TextConditioner(vocab, 8, dim=8, depth=1, num_heads=2).encode(["a 3"])


def test_word_order_is_as_visible_to_the_untrained_encoder_as_word_identity():
    """The token "1" of "a 1 left of a 4" and of "a 4 left of a 1" (positions 2 and 6): with
    position embeddings on the token embeddings' scale (the default) the encoder's outputs there
    differ from the start; at 0.02 they are the same vector, and a jointly trained model then
    draws both captions alike (README "Text-to-image")."""
    captions = ["a 1 left of a 4", "a 4 left of a 1"]
    vocab = train_vocab(captions)

    def cosines(**kwargs) -> list[float]:
        out = []
        for seed in range(5):
            torch.manual_seed(seed)
            enc = TextConditioner(vocab, max_length=16, dim=64, depth=2, num_heads=4, **kwargs)
            h = enc.eval().encode(captions)["context"]  # (2, 16, 64)
            out.append(torch.nn.functional.cosine_similarity(h[0, 2], h[1, 6], dim=0).item())
        return out

    assert max(cosines()) < 0.9
    assert min(cosines(position_init_std=0.02)) > 0.99
    with pytest.raises(ValueError, match="position_init_std=-1"):
        TextConditioner(vocab, position_init_std=-1)


# ------------------------------------------------------------------------------ captioned data
@pytest.fixture(scope="module")
def captioned():
    return MNIST5kCaptions(seed=0).build()


@pytest.mark.slow
def test_captions_are_deterministic_from_the_seed(captioned):
    again = MNIST5kCaptions(seed=0).build()
    assert again.captions == captioned.captions and torch.equal(again.images, captioned.images)
    other = MNIST5kCaptions(seed=1).build()
    assert other.captions != captioned.captions


def test_captions_hold_out_phrasings_and_combinations(captioned):
    held = captioned.held_out
    assert len(held.phrasings) == 2 and len(held.combos) == 6
    text = set(captioned.captions)
    for prefix, form in held.phrasings:  # a held-out phrasing occurs in no caption ...
        for d in range(10):
            bare = phrase(d, (prefix, form), [], None)
            assert not any(c == bare or c.startswith(bare + " ") for c in text), bare
    vocab = set(train_vocab(captioned.captions))
    for prefix, form in held.phrasings:  # ... but all its words do
        assert set(phrase(7, (prefix, form), [], None).split()) <= vocab
    for digit, attribute, level in held.combos:  # a held-out (digit, level) is never named
        words = LEVEL_WORDS[attribute][0 if level == 0 else 1]
        for i in torch.nonzero((captioned.labels == digit) & (captioned.second < 0)).flatten():
            if captioned.levels[i, ["thickness", "slant", "size"].index(attribute)] == level:
                assert not any(w in captioned.captions[i] for w in words)
    pairs = captioned.second >= 0
    assert 0.15 < pairs.float().mean() < 0.25
    composed = [captioned.captions[i] for i in torch.nonzero(pairs).flatten()]
    assert all(" left of " in c or " right of " in c for c in composed)
    left_of = sum(" left of " in c for c in composed) / len(composed)  # left_of_prob = 0.75
    assert 0.7 < left_of < 0.8, left_of
    with pytest.raises(ValueError, match=r"left_of_prob=1\.5"):
        MNIST5kCaptions(left_of_prob=1.5)


def test_measured_attributes_follow_the_augmentation(captioned):
    digit = captioned.images.new_full((1, 1, 28, 28), -1.0)
    digit[..., 4:24, 12:16] = 1.0  # a vertical bar
    one = torch.tensor([1.0])
    upright = place(digit, one, torch.zeros(1), 16.0)
    right = place(digit, one, torch.tensor([0.3]), 16.0)
    small = place(digit, torch.tensor([0.55]), torch.zeros(1), 16.0)
    thick = place(torch.nn.functional.max_pool2d(digit, 3, 1, 1), one, torch.zeros(1), 16.0)
    v = measure_attributes(torch.cat([upright, right, small, thick]))  # thickness, slant, size
    assert v[1, 1] > 0.2 > abs(v[0, 1])  # sheared: top leans right
    assert v[2, 2] < 0.7 * v[0, 2]  # smaller
    assert v[3, 0] > v[0, 0] + 0.5  # thicker stroke


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_run")
    cfg = compose_config(TEXT_FAST, root)
    train_run(cfg)
    return root, root / "run" / "checkpoints" / "diffusion" / "last.ckpt"


def sample_cfg(tmp_path: Path, ckpt: Path, *overrides: str):
    return compose_config(
        [
            f"ckpt={ckpt}",
            f"out_dir={tmp_path / 'out'}",
            "device=cpu",
            "sampler.steps=3",
            *overrides,
        ],
        tmp_path,
        config_name="sample",
    )


def test_debug_fast_text_run_restores_tokenizer_and_samples_prompts(text_run, tmp_path):
    root, ckpt = text_run
    model, stored = load_latent_diffusion(ckpt)
    assert isinstance(model.conditioner, TextConditioner)
    # the vocabulary is the one of the training captions, read back from the checkpoint alone
    dm = compose_config(TEXT_FAST, tmp_path / "dm").data
    from hydra.utils import instantiate

    from ldm.modules.text import dataset_captions

    assert model.conditioner.tokenizer.vocab == train_vocab(dataset_captions(instantiate(dm)))
    assert stored["ldm"]["config"]["model"]["diffusion"]["conditioner"]["vocab"]
    assert list((root / "run").rglob("val_samples_*.png"))  # the validation grid had prompts
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a thick 7\n\nnumber three\n")
    record = sample_run(
        sample_cfg(tmp_path, ckpt, f"prompts_file={prompts}", "num_samples=4", "guidance_scale=3")
    )
    assert record["prompts"] == ["a thick 7", "number three"]
    assert record["samples_per_prompt"] == 2
    saved = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert saved["prompts"] == record["prompts"] and (tmp_path / "out" / "grid.png").is_file()


def test_sample_text_metrics_on_a_checkpoint_whose_batch_size_is_set_per_stage(text_run, tmp_path):
    """The presets leave data.batch_size null (each stage sets its own): sample.py must read the
    data config as stage 2 had it, as fid=true does."""
    from ldm.utils.checkpoint import load_checkpoint

    _, ckpt = text_run
    stored = load_checkpoint(ckpt)
    config = stored["ldm"]["config"]
    config["diffusion"]["data"] = {**(config["diffusion"].get("data") or {}), "batch_size": 16}
    config["data"]["batch_size"] = None
    per_stage = tmp_path / "per_stage.ckpt"
    torch.save(stored, per_stage)
    cfg = sample_cfg(
        tmp_path,
        per_stage,
        "text_metrics=true",
        "text_metrics_per_prompt=1",
        "metrics.classifier.epochs=1",
        f"metrics.cache_dir={tmp_path / 'cache'}",
    )
    record = sample_run(cfg)
    result = json.loads((tmp_path / "out" / "text_metrics.json").read_text())
    assert result == record["text_metrics"]
    assert result["composition/n"] == 20 and result["per_prompt"] == 1
    both, swapped = result["composition/both_digits_acc"], result["composition/swapped_order_acc"]
    assert 0.0 <= both + swapped <= 1.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["prompt=''"], "prompt is empty"),
        (["prompt='a purple 7'"], "never saw in training: 'purple'"),
        (["class_label=3"], "text-conditioned; use prompt="),
        (["guidance_scale=2"], "needs prompt="),
    ],
)
def test_prompt_errors_are_one_line(text_run, tmp_path, overrides, message):
    _, ckpt = text_run
    cfg = sample_cfg(tmp_path, ckpt, *overrides)
    with pytest.raises(UserError, match=message) as err:
        sample_run(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_prompt_to_a_class_conditional_model_is_one_line(tmp_path):
    fixture = Path(__file__).parent / "fixtures" / "diffusion_6fef1e3_debug_fast.ckpt"
    cfg = sample_cfg(tmp_path, fixture, "prompt=seven")
    with pytest.raises(UserError, match=r"class-conditional .* takes no text") as err:
        sample_run(cfg)
    assert "\n" not in str(err.value)


def test_text_conditioning_on_data_without_captions_fails_before_stage_1(tmp_path):
    cfg = compose_config(["debug=fast", "conditioning=text", "fid.every_n_epochs=0"], tmp_path)
    with pytest.raises(UserError, match="needs captioned data"):
        train_run(cfg)
    assert not list((tmp_path / "run").rglob("*.ckpt"))


# ------------------------------------------------------------------------------ pretrained
def test_frozen_pretrained_encoder_from_a_local_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ldm.modules.text import PretrainedTextConditioner

    words = ["[PAD]", "[UNK]", "a", "thick", "7", "3"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]"
    )
    config = transformers.CLIPTextConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)
    cond = PretrainedTextConditioner(str(tmp_path), context_dim=16, max_length=6)
    assert not any(p.requires_grad for p in cond.parameters())
    out = cond({"caption": ["a thick 7", "a 3"]}, drop=torch.tensor([False, True]))
    assert out["context"].shape == (2, 6, 16)
    assert out["context_mask"][0].tolist() == [True] * 3 + [False] * 3
    assert out["context_mask"][1].tolist() == [True] + [False] * 5  # the empty caption
    assert torch.isfinite(out["context"]).all()
    with pytest.raises(ValueError, match="context_dim=32 but the model"):
        PretrainedTextConditioner(str(tmp_path), context_dim=32)


def test_overrides_compose_for_text(tmp_path):
    cfg = compose_config(TEXT_FAST, tmp_path)
    with open_dict(cfg):
        assert cfg.model.diffusion.unet.context_dim == 16
        assert cfg.model.diffusion.unet.num_classes is None
        assert cfg.model.diffusion.latent_cache is False


# ------------------------------------------------------------------------------ text metrics
class OracleClassifier(torch.nn.Module):
    """Stands in for ClassifierFeatures: answers the given digits in order (wrapping around)."""

    def __init__(self, digits: list[int]):
        super().__init__()
        self.digits, self.pos = torch.tensor(digits), 0

    def prepare(self, x):
        return x

    def classifier(self, x):
        idx = (torch.arange(len(x)) + self.pos) % len(self.digits)
        self.pos += len(x)
        return torch.nn.functional.one_hot(self.digits[idx], 10).float()


def test_text_scores_follow_the_prompts_and_the_shuffled_control_is_at_chance(captioned):
    from ldm.metrics.text import evaluation_prompts, score

    prompts = evaluation_prompts(captioned.held_out, seed=0)
    groups = {p.group for p in prompts}
    assert groups == {
        "seen_phrasing",
        "heldout_phrasing",
        "seen_attribute",
        "heldout_combo",
        "composition",
    }
    per = 3
    # "samples": real single digits of the prompted attribute level; the oracle classifier
    # answers the prompted digit
    single = (captioned.second < 0).nonzero()[0, 0]
    images = []
    for p in prompts:
        match = single
        if p.attribute >= 0:
            match = (captioned.levels[:, p.attribute] == p.level).nonzero()[0, 0]
        images += [captioned.images[match]] * per
    digits = [p.digit for p in prompts for _ in range(per)]
    out = score(prompts, torch.stack(images), per, OracleClassifier(digits), captioned.thresholds)
    assert out["seen_phrasing/digit_acc"] == 1.0 and out["heldout_phrasing/digit_acc"] == 1.0
    assert out["seen_attribute/attribute_acc"] == 1.0 == out["heldout_combo/attribute_acc"]
    assert out["shuffled/digit_acc"] < 0.3 and out["shuffled/attribute_acc"] < 0.6
    assert out["N"] == len(prompts) * per


class InkClassifier(torch.nn.Module):
    """Stands in for ClassifierFeatures: reads digit k where the ink covers k + 1 columns."""

    def prepare(self, x):
        return x

    def classifier(self, x):
        columns = (x > 0.5).flatten(2).sum(-1)[:, 0] // 16  # ink pixels / 16 rows of ink
        return torch.nn.functional.one_hot((columns - 1).clamp(0, 9), 10).float()


def test_composition_scores_tell_the_right_order_from_the_swapped_one():
    from ldm.metrics.text import Prompt, score

    def pair(left: int, right: int) -> torch.Tensor:
        image = torch.full((1, 32, 32), -1.0)
        image[:, 8:24, 0 : left + 1] = 1.0
        image[:, 8:24, 16 : 17 + right] = 1.0
        return image

    prompts = [
        Prompt("a 1 left of a 4", "composition", 1, second=4),
        Prompt("a 6 right of a 2", "composition", 2, second=6, right_of=True),
    ]
    # "left of": 2 samples in the asked order, 1 swapped, 1 with a wrong digit; "right of": the
    # first-named digit drawn on the left (swapped) 3 times, once in the asked order
    left_of = [pair(1, 4), pair(1, 4), pair(4, 1), pair(1, 5)]
    right_of = [pair(6, 2), pair(6, 2), pair(6, 2), pair(2, 6)]
    images = torch.stack([*left_of, *right_of])
    out = score(prompts, images, 4, InkClassifier(), torch.zeros(3, 2))
    assert out["composition/both_digits_acc"] == 3 / 8
    assert out["composition/swapped_order_acc"] == 4 / 8
    assert out["composition/left_of/both_digits_acc"] == 0.5
    assert out["composition/left_of/swapped_order_acc"] == 0.25
    assert out["composition/right_of/both_digits_acc"] == 0.25
    assert out["composition/right_of/swapped_order_acc"] == 0.75


# ------------------------------------------------------------------------------ own captions
def write_folder(root: Path, n: int = 4) -> None:
    from PIL import Image

    (root / "sub").mkdir(parents=True)
    for i in range(n):
        folder = root / "sub" if i % 2 else root
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(folder / f"img{i}.png")


def test_image_folder_reads_captions_jsonl_and_metadata_csv(tmp_path):
    from ldm.data import ImageDataModule
    from ldm.data.sources import ImageFolder
    from ldm.modules.text import dataset_captions

    write_folder(tmp_path)
    names = ["img0.png", "sub/img1.png", "img2.png", "sub/img3.png"]
    lines = [json.dumps({"file_name": f, "text": f"picture {i}"}) for i, f in enumerate(names)]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    source = ImageFolder(str(tmp_path), image_size=16, captions=True)
    dataset = source.build()
    by_name = {p.relative_to(tmp_path).as_posix(): dataset[i] for i, p in enumerate(dataset.paths)}
    assert by_name["sub/img3.png"]["caption"] == "picture 3"
    assert by_name["img0.png"]["image"].shape == (3, 16, 16)
    dm = ImageDataModule(source, "mine", 16, 3, None, batch_size=2, val_fraction=0.25)
    assert dataset_captions(dm) == [dm.full_dataset.captions[i] for i in dm.train_dataset.indices]
    assert len(dataset_captions(dm)) == 3
    # metadata.csv with another caption column; a missing caption is one line naming the file
    (tmp_path / "captions.jsonl").unlink()
    rows = "\n".join(f"{f},a {i}" for i, f in enumerate(names[:3]))
    (tmp_path / "metadata.csv").write_text("file_name,prompt\n" + rows + "\n")
    with pytest.raises(UserError, match=r"1 images .* have no caption \(first: 'sub/img3.png'\)"):
        ImageFolder(str(tmp_path), image_size=16, captions=True, caption_column="prompt").build()
    with pytest.raises(UserError, match="needs 'file_name' and 'text'"):
        ImageFolder(str(tmp_path), image_size=16, captions=True).build()
    plain = ImageFolder(str(tmp_path), image_size=16).build()
    assert "caption" not in plain[0]  # captions are opt-in: unconditional folders unchanged
