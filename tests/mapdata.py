"""Test data shaped as users write it: a plain map-style Dataset."""

from torch.utils.data import Dataset


class Pairs(Dataset):
    """A map-style Dataset that is not a TensorDataset, so nbtrain batches it itself."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]
