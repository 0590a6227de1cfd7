"""The MNIST regression paper's network: the original's small CNN, a 784-pixel image to one number."""

import torch
from torch import nn


class RegressionCNN(nn.Module):
    """The original's small CNN: two conv/pool/relu stages, then 320 -> 50 -> 1. No dropout, default init."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 1)

    def forward(self, x):  # x: (B, 1, 28, 28) -> (B,)
        x = torch.relu(torch.max_pool2d(self.conv1(x), 2))
        x = torch.relu(torch.max_pool2d(self.conv2(x), 2))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x).squeeze(1)
