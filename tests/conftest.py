import os

import pytest
import torch

# The suite must run on 2 CPU cores in minutes: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


TINY_SPEC = "synthetic:classes=6,train_per_class=24,test_per_class=6,size=12"


def build_tiny_world(root, spec: str = TINY_SPEC):
    """A 1-epoch cnn-nano gallery model (root/g), a BCT query model for it (root/q) and a FAISS
    index of the gallery split (root/idx): the setup the export and service tests share."""
    from hvs.data import create_dataset
    from hvs.search import build_gallery_index
    from hvs.train import TrainConfig, train

    data = create_dataset(spec)
    common = dict(data=spec, model="cnn-nano", embed_dim=16, epochs=1, batch_size=32, lr=0.05)
    train(TrainConfig(out=str(root / "g"), **common), data=data, progress=False, log=lambda _: None)
    train(
        TrainConfig(out=str(root / "q"), gallery=str(root / "g"), compat=["bct"], **common),
        data=data,
        progress=False,
        log=lambda _: None,
    )
    build_gallery_index(root / "g", spec, f"faiss:{root / 'idx'}", progress=False)
    return data
