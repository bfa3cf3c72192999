import pytest
import torch
from torch import nn

from train import models
from train.models.resnet import Bottleneck


def conv_output_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    shapes = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[1:])))
             for m in model.modules() if isinstance(m, nn.Conv2d | nn.MaxPool2d)]
    model.eval()(x)
    for hook in hooks:
        hook.remove()
    return shapes


def test_cnn10_is_the_papers_table_1():
    model = models.build("cnn10")
    assert conv_output_shapes(model, torch.zeros(1, 1, 48, 48)) == [
        (32, 48, 48), (32, 44, 44), (32, 22, 22), (64, 20, 20), (64, 10, 10), (128, 10, 10),
        (128, 5, 5),
    ]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3200, 2048), (2048, 1024),
                                                                  (1024, 7)]
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.6, 0.4]
    # 64 + 25,632 + 18,496 + 73,856 conv + 6,555,648 + 2,098,176 + 7,175 FC
    assert models.parameter_count(model) == 8_779_047
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_cnn10_batch_norm_is_an_option():
    model = models.build("cnn10", batch_norm=True)
    assert sum(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in model.modules()) == 6
    assert model(torch.zeros(2, 1, 48, 48)).shape == (2, 7)


@pytest.mark.parametrize("name", ["resnet", "resnet-plain"])
def test_resnets_give_seven_logits_at_any_size(name):
    model = models.build(name, width=8).eval()
    for size in (40, 48):
        assert model(torch.zeros(2, 1, size, size)).shape == (2, 7)


def strides(block: Bottleneck) -> tuple[int, int]:
    convs = [m for m in block.branch if isinstance(m, nn.Conv2d)]
    return convs[0].stride[0], convs[1].stride[0]


def test_improved_resnet_downsamples_in_the_3x3_and_uses_prelu_inside_the_block():
    model = models.build("resnet", width=8)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    downsampling = [b for b in blocks if 2 in strides(b)]
    assert len(downsampling) == 3
    assert all(strides(b) == (1, 2) for b in downsampling)
    assert all(isinstance(b.after_add, nn.Identity) for b in blocks)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert sum(isinstance(m, nn.PReLU) for m in model.modules()) == 1 + 2 * len(blocks)


def test_plain_resnet_downsamples_in_the_first_1x1_with_relu_after_the_addition():
    model = models.build("resnet-plain", width=8)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert all(strides(b) == (2, 1) for b in blocks if 2 in strides(b))
    assert all(isinstance(b.after_add, nn.ReLU) for b in blocks)
    assert not any(isinstance(m, nn.PReLU) for m in model.modules())


def test_plain_and_improved_have_the_same_depth():
    improved, plain = models.build("resnet", width=8), models.build("resnet-plain", width=8)
    count = lambda m: sum(isinstance(x, nn.Conv2d) for x in m.modules())  # noqa: E731
    assert count(improved) == count(plain)


def test_unknown_model_and_option_are_refused():
    with pytest.raises(ValueError, match="unknown model"):
        models.build("vgg")
    with pytest.raises(ValueError, match="no option"):
        models.build("cnn10", width=3)
