"""Text conditioners: captions -> a cross-attention context (B, L, D) and its mask (B, L).

- `TextConditioner`: a word-level tokenizer (the `tokenizers` library) whose vocabulary is built
  from the training captions before training (`train_vocab`) and stored in the model's config, so a
  checkpoint carries it and sampling needs nothing else; and a small pre-norm transformer encoder
  trained jointly with the UNet (CompVis trained theirs from scratch too: `BERTEmbedder`,
  `cond_stage_trainable: true`, Rombach et al. 2022 Sec. 4.3.1).
- `PretrainedTextConditioner`: a frozen `transformers` encoder (CLIP text model or T5 encoder)
  read from a local directory (never downloaded); `transformers` is an optional extra.

Every caption starts with a [BOS] token, so even the empty caption (the null condition of
classifier-free guidance) has one real token to attend to.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ldm.modules.conditioning import Conditioner

PAD, BOS, UNK = "[PAD]", "[BOS]", "[UNK]"
SPECIAL_TOKENS = (PAD, BOS, UNK)


def _word_level(vocab: dict[str, int] | None = None):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation
    return tokenizer


def train_vocab(captions: Iterable[str], min_frequency: int = 1) -> list[str]:
    """The word-level vocabulary of `captions` (lower-cased words and punctuation seen at least
    `min_frequency` times), special tokens first; entry i is token id i."""
    from tokenizers import trainers

    tokenizer = _word_level()
    trainer = trainers.WordLevelTrainer(
        special_tokens=list(SPECIAL_TOKENS), min_frequency=min_frequency, show_progress=False
    )
    tokenizer.train_from_iterator(list(captions), trainer=trainer)
    vocab = tokenizer.get_vocab()
    return sorted(vocab, key=vocab.__getitem__)


class CaptionTokenizer:
    """Captions -> ids (B, L) long and mask (B, L) bool (True = real token), L = max_length:
    [BOS] word word ... [PAD] ...; words outside `vocab` become [UNK]."""

    def __init__(self, vocab: Sequence[str], max_length: int):
        if list(vocab[: len(SPECIAL_TOKENS)]) != list(SPECIAL_TOKENS):
            raise ValueError(f"vocab must start with {list(SPECIAL_TOKENS)}; got {list(vocab[:3])}")
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be >= 2 ([BOS] and one word)")
        self.vocab, self.max_length = list(vocab), max_length
        self.ids = {word: i for i, word in enumerate(self.vocab)}
        self.tokenizer = _word_level(self.ids)

    def __len__(self) -> int:
        return len(self.vocab)

    def words(self, caption: str) -> list[str]:
        return self.tokenizer.encode(caption).tokens

    def unknown_words(self, caption: str) -> list[str]:
        """Words of `caption` outside the vocabulary (they would become [UNK])."""
        return [
            w
            for w, _ in self.tokenizer.pre_tokenizer.pre_tokenize_str(caption.lower())
            if w not in self.ids
        ]

    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [
            [self.ids[BOS], *e.ids][: self.max_length]
            for e in self.tokenizer.encode_batch(list(captions))
        ]
        ids = torch.full((len(rows), self.max_length), self.ids[PAD], dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids != self.ids[PAD]

    def decode(self, ids: torch.Tensor) -> str:
        """Token ids (L,) -> the words they stand for (special tokens dropped)."""
        return " ".join(self.vocab[i] for i in ids.tolist() if self.vocab[i] not in SPECIAL_TOKENS)


def check_prompts(
    captions: Sequence[str], tokenizer: CaptionTokenizer | None, max_tokens: int
) -> None:
    """One-line errors for prompts a text model cannot take: empty ones, words it never saw,
    too many tokens (they would be cut)."""
    for caption in captions:
        if not caption.strip():
            raise ValueError(
                "empty prompt: give a caption (omit the prompt for unconditional samples)"
            )
        if tokenizer is not None:
            unknown = tokenizer.unknown_words(caption)
            if unknown:
                known = ", ".join(tokenizer.vocab[len(SPECIAL_TOKENS) :][:30])
                raise ValueError(
                    f"prompt {caption!r} has words the model never saw in training: "
                    f"{', '.join(map(repr, unknown))} (its vocabulary: {known}, ...)"
                )
            n = len(tokenizer.words(caption)) + 1
            if n > max_tokens:
                raise ValueError(
                    f"prompt {caption!r} has {n} tokens with [BOS]; the model takes at most "
                    f"{max_tokens} (conditioner.max_length)"
                )


class TextConditioner(Conditioner):
    """Captions (batch["caption"], a list of B strings) -> `context` (B, L, dim) from a small
    pre-norm transformer encoder over learned token + position embeddings, and `context_mask`.

    Args:
        vocab: the tokenizer's vocabulary (`train_vocab` of the training captions; ldm.train fills
            it in when the config leaves it null).
        max_length: tokens per caption including [BOS] (longer captions are cut in training).
        dim: width of the embeddings and of the context (the UNet's `context_dim`).
        depth / num_heads / dropout: the encoder's layers, attention heads, dropout.
        min_frequency: words rarer than this in the training captions become [UNK] (used when
            the vocabulary is built; kept in the config as a record).
        pooled: also return `pooled` (B, dim), the encoder's output at [BOS], for the UNet's
            `pooled_dim`: the whole caption in one vector added to the time embedding (as
            Imagen and SDXL add a pooled text embedding), so every ResBlock sees it as it sees a
            class label. (On experiment=mnist_text it did not teach word order: trained jointly,
            the [BOS] output stayed within cosine 0.96 across captions.)
        position_init_std: std of the learned position embeddings at initialisation. 1 puts
            them on the token embeddings' scale (nn.Embedding's N(0, 1)), so word order is as
            visible to the encoder as word identity from the first step. At GPT-2's 0.02 (whose
            token embeddings are 0.02 too) they are 2% of it and, trained jointly with the UNet,
            never grow: the model reads a caption as a bag of words ("a 1 left of a 4" and "a 4
            left of a 1" give the same images; README "Text-to-image").
    """

    input_key = "caption"

    def __init__(
        self,
        vocab: Sequence[str],
        max_length: int = 16,
        dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        dropout: float = 0.0,
        min_frequency: int = 1,
        pooled: bool = False,
        position_init_std: float = 1.0,
    ):
        super().__init__()
        if vocab is None:
            raise ValueError(
                "conditioner.vocab is null: build it from the training captions "
                "(ldm.modules.text.train_vocab; train.py does this)"
            )
        if not position_init_std >= 0:
            raise ValueError(f"position_init_std={position_init_std} must be >= 0")
        self.tokenizer = CaptionTokenizer(vocab, max_length)
        self.context_dim = dim
        self.pooled_dim = dim if pooled else None
        self.token_embed = nn.Embedding(len(self.tokenizer), dim)
        self.pos_embed = nn.Parameter(torch.randn(max_length, dim) * position_init_std)
        layer = nn.TransformerEncoderLayer(
            dim, num_heads, 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def encode(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        ids, mask = self.tokenizer.encode(captions)
        ids, mask = ids.to(self.pos_embed.device), mask.to(self.pos_embed.device)  # (B, L)
        h = self.token_embed(ids) + self.pos_embed  # (B, L, D)
        h = self.norm(self.encoder(h, src_key_padding_mask=~mask))  # (B, L, D)
        out = {"context": h, "context_mask": mask}
        if self.pooled_dim:
            out["pooled"] = h[:, 0]  # (B, D): [BOS], which attends to the whole caption
        return out

    def forward(
        self, batch: dict[str, Any], drop: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        captions = list(batch[self.input_key])
        if drop is not None:
            captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        return self.encode(captions)

    def unconditional(self, num: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        return self.encode([""] * num)

    def check_conditions(self, batch: dict[str, Any]) -> None:
        check_prompts(batch[self.input_key], self.tokenizer, self.tokenizer.max_length)


class PretrainedTextConditioner(Conditioner):
    """A frozen pretrained text encoder from a local directory (`save_pretrained` layout): a CLIP
    text model or a T5 encoder (`transformers`, optional: `pip install ldm[text]`). Never downloads.

    Args:
        path: the directory holding the model's config, weights and tokenizer.
        context_dim: the encoder's hidden size, stated so the UNet can be built from the config
            (`unet.context_dim` interpolates it); checked against the loaded model.
        max_length: tokens per caption (padded to it, so every batch has the same L).
    """

    input_key = "caption"

    def __init__(self, path: str, context_dim: int, max_length: int = 32):
        super().__init__()
        try:
            import transformers
        except ImportError as err:
            raise ImportError(
                "conditioning=text_pretrained needs `transformers` (pip install transformers)"
            ) from err
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type == "t5":
            model_cls = transformers.T5EncoderModel
        elif config.model_type in ("clip", "clip_text_model"):
            model_cls = transformers.CLIPTextModel
        else:
            raise ValueError(
                f"conditioner.path={path!r} holds a {config.model_type!r} model; "
                "expected a CLIP text model or a T5 encoder"
            )
        self.encoder = model_cls.from_pretrained(path, local_files_only=True)
        self.encoder.requires_grad_(False).eval()
        self.hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        hidden = getattr(self.encoder.config, "hidden_size", None) or self.encoder.config.d_model
        if hidden != context_dim:
            raise ValueError(
                f"conditioner.context_dim={context_dim} but the model at {path!r} has hidden "
                f"size {hidden}"
            )
        self.context_dim, self.max_length = context_dim, max_length

    def train(self, mode: bool = True) -> PretrainedTextConditioner:
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout
        return self

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        device = next(self.encoder.parameters()).device
        tokens = self.hf_tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(device)
        out = self.encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        mask = tokens.attention_mask.bool()  # (B, L)
        # A tokenizer without BOS/EOS leaves the empty caption no token: keep its first position,
        # so no attention row is fully masked (softmax over nothing is NaN).
        mask[:, 0] |= ~mask.any(dim=1)
        return {"context": out.last_hidden_state, "context_mask": mask}

    def forward(
        self, batch: dict[str, Any], drop: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        captions = list(batch[self.input_key])
        if drop is not None:
            captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        return self.encode(captions)

    def unconditional(self, num: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        return self.encode([""] * num)

    def check_conditions(self, batch: dict[str, Any]) -> None:
        check_prompts(batch[self.input_key], None, self.max_length)


def dataset_captions(datamodule: Any) -> list[str]:
    """The captions of a data module's training split (items' "caption"), for `train_vocab`."""
    datamodule.setup()
    subset = datamodule.train_dataset
    dataset, indices = subset.dataset, subset.indices
    if hasattr(dataset, "captions"):
        return [dataset.captions[i] for i in indices]
    first = dataset[indices[0]] if len(indices) else {}
    if "caption" not in first:
        raise ValueError(
            f"conditioning=text needs captioned data, but data={datamodule.name} items have keys "
            f"{sorted(first)}; use data=mnist5k_captions or an image folder with captions.jsonl"
        )
    return [dataset[i]["caption"] for i in indices]


def fill_vocab(conditioner_cfg: Any, datamodule: Any) -> list[str] | None:
    """A TextConditioner config with `vocab: null` gets the vocabulary of the training captions
    (`train_vocab`, `min_frequency` from the config); returns it (None when nothing was built)."""
    if conditioner_cfg is None or not str(conditioner_cfg.get("_target_", "")).endswith(
        "TextConditioner"
    ):
        return None
    if str(conditioner_cfg["_target_"]).endswith("PretrainedTextConditioner"):
        dataset_captions(datamodule)  # still: the data must carry captions
        return None
    if conditioner_cfg.get("vocab") is not None:
        return None
    return train_vocab(dataset_captions(datamodule), conditioner_cfg.get("min_frequency", 1))
