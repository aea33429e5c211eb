import pytest
import torch
from torch import nn

from nnslim.core.select import encode_selector, normalize_selector, resolve
from tests.zoo import TinyCNN


def _resolve(model, select, exclude=None, **kw):
    return resolve(model, normalize_selector(select), normalize_selector(exclude, "exclude"), **kw)


def test_select_by_name_regex_and_type():
    m = TinyCNN()
    assert list(_resolve(m, "conv1")) == ["conv1"]
    assert list(_resolve(m, "re:conv\\d")) == ["conv1", "conv2"]
    assert list(_resolve(m, nn.BatchNorm2d)) == ["bn1", "bn2"]
    assert list(_resolve(m, ["fc", nn.BatchNorm2d])) == ["fc", "bn1", "bn2"]


def test_mapping_gives_per_module_values_last_key_wins():
    m = TinyCNN()
    got = _resolve(m, {"re:conv.*": 0.5, "conv2": 0.1})
    assert got == {"conv1": 0.5, "conv2": 0.1}


def test_exclude_removes():
    m = TinyCNN()
    assert list(_resolve(m, nn.Conv2d, exclude="conv1")) == ["conv2"]


def test_unknown_name_suggests_close_match():
    with pytest.raises(
        ValueError, match=r"no module named 'conv3'.*Did you mean \['conv2', 'conv1'\]"
    ):
        _resolve(TinyCNN(), "conv3")


def test_pattern_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="matches no module"):
        _resolve(TinyCNN(), "re:attention.*")


def test_matching_only_ineligible_modules_says_so():
    m = TinyCNN()
    eligible = [(p, x) for p, x in m.named_modules() if isinstance(x, nn.Linear)]
    with pytest.raises(ValueError, match="none of them can be handled"):
        _resolve(m, "conv1", eligible=eligible)


def test_bad_selector_types():
    with pytest.raises(TypeError, match="got 3 of type int"):
        normalize_selector([3])
    with pytest.raises(ValueError, match="invalid regular expression"):
        normalize_selector("re:(")
    with pytest.raises(TypeError, match="got 3 of type int"):
        normalize_selector({3: 0.1})


def test_json_form_round_trips():
    sel = normalize_selector({"re:a.*": 0.5, nn.Linear: 0.2})
    enc = encode_selector(sel)
    assert normalize_selector(enc) == sel
    assert torch.nn.Linear in [k for k, _ in normalize_selector(enc)]
