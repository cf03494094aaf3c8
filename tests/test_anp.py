"""ANP (adversarial neuron pruning): the masked and perturbed BatchNorm equals a BatchNorm with
changed weights, a neuron that hurts the clean loss gets its mask driven to 0 and is pruned (BN weight
and bias 0), the original weights are otherwise untouched, stop, bad settings, and on a real poisoned
CIFAR-10 model the defense lowers ASR while keeping clean accuracy."""
import copy
import threading

import pytest
import torch
from torch import nn

from bdft_core.defenses.anp import ANP, NeuronPerturbation, mask_layers, prune
from bdft_core.errors import ConfigError


class Two(nn.Module):
    """Two neurons that both copy the input; the head reads neuron 0 for class 1 and neuron 1 against
    it, so neuron 1 only hurts: removing it makes every prediction more confident and right."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.classifier = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.classifier.weight.copy_(torch.tensor([[-2.0, 1.0], [2.0, -1.0]]))
            self.classifier.bias.zero_()

    def forward(self, x):
        return self.classifier(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def _data(n=256):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, 1, 1), generator=g, dtype=torch.uint8)
    return x, (x.view(-1) > 127).long()


def test_masked_and_perturbed_bn_equals_a_bn_with_changed_weights():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.2, 0.3, -1.0]))
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
        bn.running_var.copy_(torch.tensor([1.5, 0.5, 2.0]))
    x = torch.randn(4, 3, 2, 2)
    ref = copy.deepcopy(bn)
    pert = NeuronPerturbation(nn.Sequential(bn), eps=0.4)
    m, dw, db = torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0.4, -0.4, 0.1]), torch.tensor([-0.4, 0.2, 0.4])
    with torch.no_grad():
        pert.masks[0].copy_(m)
        pert.dw[0].copy_(dw)
        pert.db[0].copy_(db)
        ref.weight.mul_(m)
        masked = ref(x)
        ref.weight.copy_(bn.weight * (m + dw))
        ref.bias.copy_(bn.bias * (1 + db))
        perturbed = ref(x)
        assert torch.allclose(bn(x), masked, atol=1e-6)  # the mask always applies
        pert.perturb = True
        assert torch.allclose(bn(x), perturbed, atol=1e-6)
    pert.remove()
    with torch.no_grad():
        assert torch.allclose(bn(x), copy.deepcopy(bn)(x))


def test_prune_zeroes_the_low_masks_weight_and_bias():
    m = Two()
    before = m.bn.weight.detach().clone(), m.bn.bias.detach().clone()
    with torch.no_grad():
        m.bn.bias.fill_(0.5)
    n = prune(m, [torch.tensor([0.9, 0.1])], threshold=0.2)
    assert n == 1
    assert m.bn.weight[1].item() == 0.0 and m.bn.bias[1].item() == 0.0
    assert m.bn.weight[0].item() == before[0][0].item() and m.bn.bias[0].item() == 0.5


def test_the_harmful_neuron_is_masked_out_and_pruned():
    x, y = _data()
    m = Two()
    original = copy.deepcopy(m.state_dict())
    anp = ANP(mask_steps=40, batch_size=64)
    res = anp.apply(m, x, y, seed=0, amp="off", channels_last=False)
    mask = res.artefacts["anp_mask"]
    assert mask[1] < 0.2 <= mask[0]  # the harmful neuron's mask fell, the useful one's stayed
    assert res.final["pruned_neurons"] == 1 and res.steps == 40 and not res.stopped
    assert m.bn.weight[1].item() == 0.0 and m.bn.bias[1].item() == 0.0
    # nothing else changed: weights, the other neuron, the BN statistics (the masks learn on a copy)
    state = m.state_dict()
    for k, v in original.items():
        if k not in ("bn.weight", "bn.bias"):
            assert torch.equal(state[k], v), k
    assert state["bn.weight"][0] == original["bn.weight"][0]


def test_a_mask_forced_low_is_pruned():
    class Forced(ANP):
        def learn_masks(self, model, *a, **kw):
            return [torch.tensor([1.0, 0.05])], int(self.params["mask_steps"])

    x, y = _data(64)
    m = Two()
    res = Forced(mask_steps=3).apply(m, x, y)
    assert res.final["pruned_neurons"] == 1 and res.final["neurons"] == 2
    assert m.bn.weight.tolist() == [1.0, 0.0] and m.bn.bias.tolist() == [0.0, 0.0]


def test_bn_layers_and_stop():
    from bdft_core.models import build_model

    f = build_model("fastnet", 10, 3, widths=[8, 8, 8])
    assert len(mask_layers(f)) == 6  # two per conv block
    x, y = _data(64)
    m = Two()
    stop = threading.Event()
    stop.set()
    seen = []
    res = ANP(mask_steps=5).apply(m, x, y, stop=stop, callbacks=[("on_batch", seen.append)])
    assert res.stopped and res.steps == 0 and res.final["pruned_neurons"] == 0 and not seen
    res = ANP(mask_steps=5, batch_size=16).apply(m, x, y, callbacks=[("on_batch", lambda p: seen.append(p.step))])
    assert seen == [1, 2, 3, 4, 5] and res.total_steps == 5


@pytest.mark.parametrize("bad, match", [({"eps": 1.0}, "eps"), ({"eps": -0.1}, "eps"), ({"alpha": 1.5}, "alpha"),
                                        ({"mask_lr": 0}, "mask_lr"), ({"anp_steps": 0}, "anp_steps"),
                                        ({"threshold": 1.5}, "threshold"), ({"mask_steps": 0}, "mask_steps"),
                                        ({"mask_steps": 2.5}, "mask_steps"), ({"batch_size": 0}, "batch size"),
                                        ({"lr": 0.1}, "no parameter")])
def test_bad_settings(bad, match):
    with pytest.raises(ConfigError, match=match):
        ANP(**bad)


def test_anp_on_a_real_poisoned_model(cifar_badnets):
    from bdft_core.defenses import DEFENSES
    from bdft_core.pipeline import run_defense

    DEFENSES.setdefault(ANP.name, ANP)
    run, model = cifar_badnets
    d_run, _ = run_defense(run, "anp", model=model)
    print("anp", run.final, "->", d_run.final, d_run.timings)
    assert d_run.timings["total_s"] > 0 and d_run.defense["name"] == "anp"
    assert d_run.final["pruned_neurons"] > 0
    assert d_run.final["asr"] < run.final["asr"] - 0.3  # the backdoor weakens
    assert d_run.final["clean_acc"] > run.final["clean_acc"] - 0.1  # clean accuracy is mostly kept
