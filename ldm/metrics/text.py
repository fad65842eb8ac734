"""Does a text-to-image model follow its prompts? Metrics on captioned MNIST (ldm.data.captions).

Prompts in five groups, `per_prompt` samples each (seeded):
- `seen_phrasing`: "7", "number seven", ... in phrasings used in training;
- `heldout_phrasing`: the phrasings held out of every training caption (their words are known);
- `seen_attribute`: a digit with one attribute level ("a thick 7", "3 slanted left") whose
  (digit, level) pair occurs in training captions;
- `heldout_combo`: the (digit, level) pairs never named in training;
- `composition`: "a 3 left of a 7" (two digits, a class label cannot say which goes where).

Scores: digit accuracy of the project's classifier (CAS) per group; attribute accuracy = the
attribute re-measured on the sample falls in the prompted tertile (chance 1/3); compositions: both
halves classified right (chance 1/90 for an ordered pair of distinct digits); and a shuffled-caption
control: the seen-phrasing samples scored against the digits of a shuffled prompt list (chance
~0.1), the attribute samples against shuffled levels (~1/3): a model that ignores its prompt, or a
classifier that reads something else, would score the same with and without shuffling.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from ldm.data.captions import (
    ATTRIBUTES,
    CANVAS,
    LEVEL_WORDS,
    HeldOut,
    composition,
    measure_attributes,
    phrase,
    to_levels,
)

GROUPS = ("seen_phrasing", "heldout_phrasing", "seen_attribute", "heldout_combo", "composition")


@dataclass
class Prompt:
    text: str
    group: str
    digit: int
    second: int = -1  # right digit of a composition
    attribute: int = -1  # index into ATTRIBUTES
    level: int = -1  # 0 or 2
    right_of: bool = False  # a composition phrased "B right of A"


def attribute_prompt(digit: int, attribute: str, level: int, phrasing: tuple[str, str]) -> str:
    word = LEVEL_WORDS[attribute][0 if level == 0 else 1][0]
    if attribute == "slant":
        return phrase(digit, phrasing, [], word)
    return phrase(digit, phrasing, [word], None)


def evaluation_prompts(
    held: HeldOut, seed: int = 0, max_attribute_prompts: int = 30
) -> list[Prompt]:
    """The prompts of every group (deterministic from `seed`)."""
    rng = random.Random(f"{seed}-text-eval")
    train = held.train_phrasings
    prompts = []
    for d in range(10):
        for p in rng.sample(train, 2):
            prompts.append(Prompt(phrase(d, p, [], None), "seen_phrasing", d))
        for p in held.phrasings:
            prompts.append(Prompt(phrase(d, p, [], None), "heldout_phrasing", d))
    combos = [(d, a, lv) for d in range(10) for a in ATTRIBUTES for lv in (0, 2)]
    seen = [c for c in combos if c not in held.combos]
    seen = rng.sample(seen, min(max_attribute_prompts, len(seen)))
    for group, chosen in (("seen_attribute", seen), ("heldout_combo", held.combos)):
        for d, a, lv in chosen:
            text = attribute_prompt(d, a, lv, rng.choice(train))
            prompts.append(Prompt(text, group, d, attribute=ATTRIBUTES.index(a), level=lv))
    pairs = [(a, b) for a in range(10) for b in range(10) if a != b]
    for a, b in rng.sample(pairs, 20):
        pa, pb = phrase(a, rng.choice(train), [], None), phrase(b, rng.choice(train), [], None)
        right_of = rng.random() >= 0.5
        prompts.append(
            Prompt(composition(pa, pb, right_of), "composition", a, second=b, right_of=right_of)
        )
    return prompts


def halves(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right halves of (N, 1, 32, 32) images, each centred on a blank 32x32 canvas."""
    left = torch.full_like(images, -1.0)
    right = torch.full_like(images, -1.0)
    q = CANVAS // 4
    left[..., q : q + CANVAS // 2] = images[..., : CANVAS // 2]
    right[..., q : q + CANVAS // 2] = images[..., CANVAS // 2 :]
    return left, right


@torch.no_grad()
def predict_digits(classifier: Any, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Classifier argmax (N,) of images (N, C, H, W) in [-1, 1] (ClassifierFeatures input)."""
    out = []
    for i in range(0, len(images), batch_size):
        device = next(classifier.parameters(), torch.empty(0)).device
        x = ((images[i : i + batch_size].float() + 1) / 2).to(device)
        out.append(classifier.classifier(classifier.prepare(x)).argmax(1).cpu())
    return torch.cat(out)


def shuffled(values: torch.Tensor, seed: int) -> torch.Tensor:
    """`values` in a seeded random order: the targets of the shuffled-caption control."""
    return values[torch.randperm(len(values), generator=torch.Generator().manual_seed(seed))]


def score(
    prompts: list[Prompt],
    images: torch.Tensor,
    per_prompt: int,
    classifier: Any,
    thresholds: torch.Tensor,
    seed: int = 0,
) -> dict[str, Any]:
    """Scores of samples `images` (len(prompts) * per_prompt, 1, 32, 32), prompt-major."""
    group = [p.group for p in prompts for _ in range(per_prompt)]
    digit = torch.tensor([p.digit for p in prompts]).repeat_interleave(per_prompt)
    second = torch.tensor([p.second for p in prompts]).repeat_interleave(per_prompt)
    attribute = torch.tensor([p.attribute for p in prompts]).repeat_interleave(per_prompt)
    level = torch.tensor([p.level for p in prompts]).repeat_interleave(per_prompt)
    right_of = torch.tensor([p.right_of for p in prompts]).repeat_interleave(per_prompt)
    pred = predict_digits(classifier, images)
    levels = to_levels(measure_attributes(images), thresholds)  # (N, 3)
    measured = levels.gather(1, attribute.clamp(min=0)[:, None])[:, 0]
    out: dict[str, Any] = {"N": len(images), "per_prompt": per_prompt}

    def mask_of(g: str) -> torch.Tensor:
        return torch.tensor([x == g for x in group])

    for g in GROUPS:
        m = mask_of(g)
        if not m.any():
            continue
        out[f"{g}/n"] = int(m.sum())
        if g == "composition":
            left, right = halves(images[m])
            read_left = predict_digits(classifier, left)
            read_right = predict_digits(classifier, right)
            both = (read_left == digit[m]) & (read_right == second[m])
            out[f"{g}/both_digits_acc"] = both.float().mean().item()
            # both named digits, wrong order: "ignores left/right", not "wrong digits"
            swapped = (read_left == second[m]) & (read_right == digit[m])
            out[f"{g}/swapped_order_acc"] = swapped.float().mean().item()
            # per relation word: a model that draws the first-named digit on the left scores
            # high on "left of" prompts and swapped on "right of" ones
            for name, r in (("left_of", ~right_of[m]), ("right_of", right_of[m])):
                if r.any():
                    out[f"{g}/{name}/both_digits_acc"] = both[r].float().mean().item()
                    out[f"{g}/{name}/swapped_order_acc"] = swapped[r].float().mean().item()
            continue
        out[f"{g}/digit_acc"] = (pred[m] == digit[m]).float().mean().item()
        if g in ("seen_attribute", "heldout_combo"):
            out[f"{g}/attribute_acc"] = (measured[m] == level[m]).float().mean().item()
            for j, name in enumerate(ATTRIBUTES):
                mj = m & (attribute == j)
                if mj.any():
                    out[f"{g}/{name}_acc"] = (measured[mj] == level[mj]).float().mean().item()
    m = mask_of("seen_phrasing")
    if m.any():
        out["shuffled/digit_acc"] = (pred[m] == shuffled(digit[m], seed)).float().mean().item()
    m = mask_of("seen_attribute")
    if m.any():
        perm_level = shuffled(level[m], seed)
        out["shuffled/attribute_acc"] = (measured[m] == perm_level).float().mean().item()
    out["chance"] = {"digit_acc": 0.1, "attribute_acc": 1 / 3, "both_digits_acc": 1 / 90}
    return out


@torch.no_grad()
def evaluate_text_model(
    model: Any,
    classifier: Any,
    held: HeldOut,
    thresholds: torch.Tensor,
    *,
    per_prompt: int = 4,
    guidance_scale: float = 3.0,
    seed: int = 0,
    batch_size: int = 256,
    sampler: Any = None,
) -> dict[str, Any]:
    """Sample `per_prompt` images for every evaluation prompt and score them (`score`)."""
    prompts = evaluation_prompts(held, seed)
    texts = [p.text for p in prompts for _ in range(per_prompt)]
    g = torch.Generator().manual_seed(seed)
    images = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        images.append(
            model.sample(
                len(chunk),
                prompts=chunk,
                guidance_scale=guidance_scale,
                generator=g,
                sampler=sampler,
            )
            .float()
            .cpu()
        )
    result = score(prompts, torch.cat(images), per_prompt, classifier, thresholds, seed)
    result["guidance_scale"] = guidance_scale
    return result


def summary_line(result: dict[str, Any]) -> str:
    keys = [
        ("seen_phrasing/digit_acc", "digit seen"),
        ("heldout_phrasing/digit_acc", "digit held-out phrasing"),
        ("seen_attribute/attribute_acc", "attribute seen"),
        ("heldout_combo/attribute_acc", "attribute held-out combo"),
        ("composition/both_digits_acc", "two digits"),
        ("composition/swapped_order_acc", "two digits swapped"),
        ("composition/left_of/both_digits_acc", "two digits 'left of'"),
        ("composition/right_of/both_digits_acc", "two digits 'right of'"),
        ("shuffled/digit_acc", "shuffled digit"),
        ("shuffled/attribute_acc", "shuffled attribute"),
    ]
    parts = [f"{label} {result[k]:.3f}" for k, label in keys if k in result]
    return f"text metrics (N={result['N']}, guidance {result.get('guidance_scale')}): " + ", ".join(
        parts
    )


def text_eval_inputs(datamodule: Any, metrics_cfg: Any) -> tuple[Any, HeldOut, torch.Tensor]:
    """(classifier, held-out choices, attribute thresholds) for captioned MNIST data: the
    project's classifier for that data (trained once, cached under `metrics_cfg.cache_dir`)."""
    from omegaconf import DictConfig, OmegaConf

    from ldm.metrics.fid import build_extractor

    datamodule.setup("fit")
    dataset = datamodule.full_dataset
    if not hasattr(dataset, "held_out"):
        raise ValueError(
            f"text metrics need captioned MNIST (data=mnist5k_captions); data={datamodule.name}"
        )
    settings = metrics_cfg.get("classifier")
    if isinstance(settings, DictConfig):
        settings = OmegaConf.to_container(settings, resolve=True)
    _, classifier = build_extractor(
        "classifier", datamodule, metrics_cfg.cache_dir, None, settings, verbose=False
    )
    return classifier, dataset.held_out, dataset.thresholds
