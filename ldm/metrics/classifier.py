"""The project's own feature classifier: a small LeNet-like CNN whose penultimate layer gives FID
features.

Inception weights cannot be downloaded on offline machines, so FID/KID on small datasets use the
penultimate activations of this classifier, trained once per dataset (ldm.metrics.train_classifier).
Its logits also give the class-conditional accuracy of samples (CAS).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Spatial size the conv trunk ends at; larger inputs are average-pooled down to it.
TRUNK_SIZE = 5


class FeatureClassifier(nn.Module):
    """LeNet-5-like CNN (LeCun et al. 1998, "Gradient-based learning applied to document
    recognition").

    Two 5x5 conv + BatchNorm + ReLU + 2x2 max-pool stages, a ReLU hidden layer of `feature_dim`
    units (the FID features) and a linear head. Inputs are images in [-1, 1] (the data convention)
    of shape (B, in_channels, image_size, image_size).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        widths: tuple[int, int] | list[int],
        feature_dim: int,
    ):
        super().__init__()
        if image_size < 16:
            raise ValueError(
                f"image_size={image_size} is too small for the classifier; valid: >= 16"
            )
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be >= 2")
        w1, w2 = widths
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        self.widths, self.feature_dim = (int(w1), int(w2)), feature_dim
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, w1, 5),  # (B, w1, S-4, S-4)
            nn.BatchNorm2d(w1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w1, w2, 5),
            nn.BatchNorm2d(w2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(TRUNK_SIZE),  # identity at image_size=32: (B, w2, 5, 5)
            nn.Flatten(),  # (B, w2 * 25)
        )
        self.hidden = nn.Linear(w2 * TRUNK_SIZE * TRUNK_SIZE, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def config(self) -> dict:
        """Constructor arguments as plain data (stored next to the weights)."""
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "widths": list(self.widths),
            "feature_dim": self.feature_dim,
        }

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer activations (B, feature_dim) of images (B, C, S, S) in [-1, 1]."""
        return F.relu(self.hidden(self.trunk(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.features(x))
