"""A user's own model classes, as a user of dmm would write them (key names unlike dmm's)."""

from torch import nn

NOT_A_CLASS = 3


class TinyResNet(nn.Module):
    """A small ResNet-style classifier: stem, one residual block, global pool, classifier."""

    def __init__(self, num_classes: int = 4, in_channels: int = 1, channels: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU())
        self.block_conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.block_norm = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        h = self.stem(x)
        h = (h + self.block_norm(self.block_conv(h))).relu()
        return self.classifier(self.pool(h).flatten(1))
