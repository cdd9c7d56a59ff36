"""Which modules the receiver re-processes after an in-place reload (the end-to-end proof that
this fixes tied output layers is tests/models/test_architectures.py's Qwen2 and Gemma cases)."""

from __future__ import annotations

import pytest
from torch import nn

from rlhf_ray.sync.receiver import reprocess_tied, tied_modules


class UnquantizedMethod:
    def __init__(self):
        self.processed: list[nn.Module] = []

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.processed.append(layer)


class QuantizedMethod(UnquantizedMethod):
    pass


def tiny(method_cls=UnquantizedMethod, tie: bool = True) -> nn.Module:
    model = nn.Module()
    model.embed, model.mid, model.head = nn.Embedding(5, 3), nn.Linear(3, 3), nn.Linear(3, 5, bias=False)
    if tie:
        model.head.weight = model.embed.weight
    for m in (model.embed, model.mid, model.head):
        m.quant_method = method_cls()
    return model


def test_tied_modules_are_the_ones_sharing_a_parameter():
    model = tiny()
    assert tied_modules(model) == [model.embed, model.head]
    assert tied_modules(tiny(tie=False)) == []


def test_reprocess_redoes_only_tied_modules():
    model = tiny()
    assert reprocess_tied(model) == 2
    assert model.embed.quant_method.processed == [model.embed]
    assert model.head.quant_method.processed == [model.head]
    assert model.mid.quant_method.processed == []
    assert reprocess_tied(tiny(tie=False)) == 0


def test_tied_quantized_module_is_refused():
    with pytest.raises(NotImplementedError, match="tied, quantized Embedding .*QuantizedMethod"):
        reprocess_tied(tiny(QuantizedMethod))
