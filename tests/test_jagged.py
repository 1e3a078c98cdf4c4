"""``JaggedFeatures.select_samples`` is vectorised; check it against the obvious per-sample loop."""

from __future__ import annotations

import pytest
import torch

from nestrec.sparse import JaggedFeatures


def _naive(features: JaggedFeatures, index: torch.Tensor) -> dict:
    out = {}
    for key, (values, lengths) in features.split().items():
        offsets = [0, *torch.cumsum(lengths, 0).tolist()]
        pieces = [values[offsets[i] : offsets[i + 1]] for i in index.tolist()]
        out[key] = (torch.cat(pieces) if pieces else values[:0], lengths[index])
    return out


@pytest.mark.parametrize("index", [[3, 0, 2], [1, 1, 4], [], [0, 1, 2, 3, 4], [2]])
def test_select_samples_matches_per_sample_loop(index):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([2, 0, 3, 1, 0])  # samples with no ids included
    features = JaggedFeatures.from_dict(
        {
            "history": (torch.randint(0, 50, (int(lengths.sum()),), generator=g), lengths),
            "user": (torch.arange(5) * 7, torch.ones(5, dtype=torch.long)),
        }
    )
    index = torch.tensor(index, dtype=torch.long)
    got = features.select_samples(index).split()
    for key, (values, lens) in _naive(features, index).items():
        assert torch.equal(got[key][0], values) and torch.equal(got[key][1], lens), key


def test_round_trip_through_torchrec_keyed_jagged_tensor():
    pytest.importorskip(
        "torchrec", reason="TorchRec is not installed here (make torchrec-venv builds it; CI has none)"
    )
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    kjt = KeyedJaggedTensor(
        keys=["user", "history"],
        values=torch.tensor([3, 7, 1, 2, 9, 4]),
        lengths=torch.tensor([1, 1, 3, 1]),  # user: 1, 1; history: 3, 1
    )
    features = JaggedFeatures.from_kjt(kjt)
    assert features.keys == ["user", "history"] and features.batch_size == 2
    values, lengths = features.split()["history"]
    assert values.tolist() == kjt["history"].values().tolist() and lengths.tolist() == [3, 1]
    back = features.to_kjt()
    assert back.keys() == kjt.keys() and torch.equal(back.values(), kjt.values())
    assert torch.equal(back.lengths(), kjt.lengths())
    weighted = KeyedJaggedTensor(
        keys=["u"], values=torch.tensor([1]), lengths=torch.tensor([1]), weights=torch.ones(1)
    )
    with pytest.raises(ValueError, match="weighted"):
        JaggedFeatures.from_kjt(weighted)
